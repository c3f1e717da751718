# The bench smoke test: runs faultline-bench and checks, in this order,
#   - its exit code is 0 (faultline-bench exits 1 when a page was served with
#     wrong content or a configuration ended in an error, 2 when it could not
#     set up);
#   - it printed the table of the scenario (the run reached the report);
#   - no "FAILED:" line;
#   - with CI=true, no configuration was skipped for a missing capability
#     (2 MiB huge pages, /dev/kvm): CI must run every row (tests/capability.h).
# A ctest PASS_REGULAR_EXPRESSION would ignore the exit code, hence this script.
#
#   cmake -DBENCH=<program> -DARGS="<arguments>" -DEXPECT="<regex>" -P smoke_test.cmake
if(NOT BENCH OR NOT DEFINED EXPECT)
  message(FATAL_ERROR "usage: cmake -DBENCH=<program> -DARGS=<arguments> -DEXPECT=<regex> -P smoke_test.cmake")
endif()
separate_arguments(args UNIX_COMMAND "${ARGS}")
execute_process(COMMAND ${BENCH} ${args} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
message("${out}")
if(NOT rc STREQUAL "0")
  message(FATAL_ERROR "${BENCH} ${ARGS} exited with ${rc}, not 0")
endif()
if(NOT out MATCHES "${EXPECT}")
  message(FATAL_ERROR "${BENCH} ${ARGS} did not print '${EXPECT}'")
endif()
if(out MATCHES "FAILED:")
  message(FATAL_ERROR "${BENCH} ${ARGS} printed a FAILED: line")
endif()
if(out MATCHES "configurations skipped")
  if("$ENV{CI}" STREQUAL "true" OR "$ENV{CI}" STREQUAL "1")
    message(FATAL_ERROR "missing capability, and CI=true makes that a failure: ${BENCH} skipped configurations "
                        "(see its notes above)")
  endif()
  message("note: some configurations were skipped for a missing capability (see above); CI=true fails on this")
endif()
