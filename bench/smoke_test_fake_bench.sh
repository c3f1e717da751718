#!/bin/sh
# Stands in for faultline-bench in the test of the smoke test itself: prints
# what a good run prints, then exits with the status given as $1.
echo "Scenario 1: on-demand fault service"
exit "$1"
