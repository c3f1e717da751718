# The bench smoke test: runs faultline-bench and checks, in this order,
#   - its exit code is 0 (faultline-bench exits 1 when a page was served with
#     wrong content or a configuration ended in an error, 2 when it could not
#     set up);
#   - it printed the table of the scenario (the run reached the report);
#   - no "FAILED:" line;
#   - with CI=true, no configuration was skipped for a missing capability
#     (2 MiB huge pages, /dev/kvm) unless FAULTLINE_CI_WAIVE names it: CI
#     must run every row (tests/capability.h).
# A ctest PASS_REGULAR_EXPRESSION would ignore the exit code, hence this script.
#
#   cmake -DBENCH=<program> -DARGS="<arguments>" -DEXPECT="<regex>" -P smoke_test.cmake
cmake_minimum_required(VERSION 3.25)  # script mode: IN_LIST and today's policies
if(NOT BENCH OR NOT DEFINED EXPECT)
  message(FATAL_ERROR "usage: cmake -DBENCH=<program> -DARGS=<arguments> -DEXPECT=<regex> -P smoke_test.cmake")
endif()
separate_arguments(args UNIX_COMMAND "${ARGS}")
execute_process(COMMAND ${BENCH} ${args} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
message("${out}")
if(NOT rc STREQUAL "0")
  message("smoke test: exit code ${rc}, not 0")  # one unwrapped line (FATAL_ERROR text is wrapped)
  message(FATAL_ERROR "${BENCH} ${ARGS} exited with ${rc}, not 0")
endif()
if(NOT out MATCHES "${EXPECT}")
  message(FATAL_ERROR "${BENCH} ${ARGS} did not print '${EXPECT}'")
endif()
if(out MATCHES "FAILED:")
  message(FATAL_ERROR "${BENCH} ${ARGS} printed a FAILED: line")
endif()
# The notes faultline-bench prints for each capability it could not use.
set(ci FALSE)
if("$ENV{CI}" STREQUAL "true" OR "$ENV{CI}" STREQUAL "1")
  set(ci TRUE)
endif()
string(REPLACE "," ";" waived "$ENV{FAULTLINE_CI_WAIVE}")
foreach(capability_note "hugepages|2 MiB page configurations skipped" "kvm|vCPU configurations skipped")
  string(REPLACE "|" ";" pair "${capability_note}")
  list(GET pair 0 capability)
  list(GET pair 1 note)
  if(out MATCHES "${note}")
    if(ci AND NOT capability IN_LIST waived)
      message(FATAL_ERROR "missing capability ${capability}, and CI=true makes that a failure: ${note}")
    endif()
    message("note: missing capability ${capability}: ${note}")
  endif()
endforeach()
