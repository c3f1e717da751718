# How every test of faultline is registered with ctest.
#
# Every test program goes through one of the two functions below; nothing
# calls gtest_discover_tests() or add_test() directly. Both REQUIRE an explicit
# SANITIZERS YES|NO, and configuration fails without it. Every test, YES or NO,
# runs in scripts/test.sh's AddressSanitizer and UBSan tree; its
# ThreadSanitizer stage builds the target `sanitizer-test-programs` (every
# program registered with SANITIZERS YES, plus the programs they spawn) and
# runs `ctest -L sanitizers --no-tests=error`: a new suite cannot miss it, it
# can only be left out by writing SANITIZERS NO. faultline_check_test_registrations()
# (called at the end of the root CMakeLists.txt) fails configuration when a
# Google Test program or an add_test() bypassed these functions.
#
#   faultline_gtest(<target> SANITIZERS YES|NO [HUGEPAGES | HUGEPAGE_TESTS <filter>]
#                   [SPAWNS <program>...] [TIMEOUT <s>] [DISCOVERY_TIMEOUT <s>]
#                   [PROPERTIES <name> <value>...])
#     <target>: a Google Test executable already made with add_executable().
#     SANITIZERS YES: its tests run again under ThreadSanitizer (label
#       `sanitizers`). Say YES for anything that runs threads, the fault path,
#       the protocol or the kernel interface; NO only with a reason written
#       beside the call.
#     HUGEPAGES: its tests change vm.nr_hugepages, which is system-wide: they
#       take the `hugepages` resource lock, so ctest never runs two at once.
#     HUGEPAGE_TESTS: only the tests this --gtest_filter pattern matches take
#       the lock (a program of which few tests reserve huge pages).
#     SPAWNS: programs its tests start (faultline, faultline-client): built
#       before it, and with it into the ThreadSanitizer stage.
#     TIMEOUT: seconds per test (default 300); a fault nobody serves hangs,
#       and a hang must fail. DISCOVERY_TIMEOUT: for --gtest_list_tests (default 60).
#     PROPERTIES: more ctest properties for every test of the program, each
#       with one value (e.g. FIXTURES_REQUIRED, ENVIRONMENT: see s3_test).
#
#   faultline_command_test(NAME <name> SANITIZERS YES|NO [HUGEPAGES]
#                          [TIMEOUT <s>] COMMAND <command> [<arg>...])
#     A test that is a command rather than a Google Test program (e.g. the
#     bench smoke test). Its exit code decides: do not give it a
#     PASS_REGULAR_EXPRESSION, which makes ctest ignore the exit code.
#
# Labels: `sanitizers` on every test registered with SANITIZERS YES.

add_custom_target(sanitizer-test-programs)
set_property(GLOBAL PROPERTY FAULTLINE_REGISTERED_PROGRAMS "")
set_property(GLOBAL PROPERTY FAULTLINE_REGISTERED_TESTS "")

function(_faultline_sanitizer_choice out function_name what value)
  if(NOT DEFINED value OR value STREQUAL "")
    message(FATAL_ERROR "${function_name}(${what}): SANITIZERS YES|NO is required, so that no test program "
                        "leaves the ThreadSanitizer stage by accident (cmake/FaultlineTesting.cmake)")
  endif()
  string(TOUPPER "${value}" v)
  if(v STREQUAL "YES" OR v STREQUAL "ON" OR v STREQUAL "TRUE")
    set(${out} TRUE PARENT_SCOPE)
  elseif(v STREQUAL "NO" OR v STREQUAL "OFF" OR v STREQUAL "FALSE")
    set(${out} FALSE PARENT_SCOPE)
  else()
    message(FATAL_ERROR "${function_name}(${what}): SANITIZERS must be YES or NO, not '${value}'")
  endif()
endfunction()

# In a sanitizer build the test programs' own sources (not the code they
# test, which keeps the build's -O1) compile with -Og: they are most of the
# compiling (~450 of ~820 CPU-seconds under AddressSanitizer on a 2-core
# host), and an instrumented -O1 compile of a Google Test file costs ~1.6x an
# -Og one (tests/security_test.cc: 17-23 s against 11-16 s).
function(_faultline_test_code_options target)
  if(FAULTLINE_SANITIZER)
    target_compile_options(${target} PRIVATE -Og)
  endif()
endfunction()

function(faultline_gtest target)
  cmake_parse_arguments(PARSE_ARGV 1 ARG "HUGEPAGES" "SANITIZERS;TIMEOUT;DISCOVERY_TIMEOUT;HUGEPAGE_TESTS"
                        "SPAWNS;PROPERTIES")
  if(ARG_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "faultline_gtest(${target}): unknown arguments ${ARG_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT TARGET ${target})
    message(FATAL_ERROR "faultline_gtest(${target}): no such target (add_executable it first)")
  endif()
  _faultline_sanitizer_choice(sanitized faultline_gtest ${target} "${ARG_SANITIZERS}")
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  if(NOT ARG_DISCOVERY_TIMEOUT)
    set(ARG_DISCOVERY_TIMEOUT 60)
  endif()
  set(properties TIMEOUT ${ARG_TIMEOUT} ${ARG_PROPERTIES})
  if(ARG_HUGEPAGES)
    list(APPEND properties RESOURCE_LOCK hugepages)
  endif()
  _faultline_test_code_options(${target})
  if(sanitized)
    # One label only: gtest_discover_tests() cannot pass a list-valued property.
    list(APPEND properties LABELS sanitizers)
    add_dependencies(sanitizer-test-programs ${target})
  endif()
  foreach(program ${ARG_SPAWNS})
    if(NOT TARGET ${program})
      message(FATAL_ERROR "faultline_gtest(${target}): its tests spawn ${program}, which this configuration "
                          "does not build (FAULTLINE_ONLY_DIRS?)")
    endif()
    add_dependencies(${target} ${program})
    if(sanitized)
      add_dependencies(sanitizer-test-programs ${program})
    endif()
  endforeach()
  if(ARG_HUGEPAGE_TESTS)
    if(ARG_HUGEPAGES)
      message(FATAL_ERROR "faultline_gtest(${target}): HUGEPAGES (every test) or HUGEPAGE_TESTS (some), not both")
    endif()
    # Two listings of one program: the tests the pattern leaves out, without
    # the lock, and those it matches, with it.
    gtest_discover_tests(${target} DISCOVERY_TIMEOUT ${ARG_DISCOVERY_TIMEOUT} TEST_FILTER "-${ARG_HUGEPAGE_TESTS}"
                         PROPERTIES ${properties})
    gtest_discover_tests(${target} DISCOVERY_TIMEOUT ${ARG_DISCOVERY_TIMEOUT} TEST_FILTER "${ARG_HUGEPAGE_TESTS}"
                         PROPERTIES ${properties} RESOURCE_LOCK hugepages)
  else()
    gtest_discover_tests(${target} DISCOVERY_TIMEOUT ${ARG_DISCOVERY_TIMEOUT} PROPERTIES ${properties})
  endif()
  set_property(GLOBAL APPEND PROPERTY FAULTLINE_REGISTERED_PROGRAMS ${target})
endfunction()

function(faultline_command_test)
  cmake_parse_arguments(PARSE_ARGV 0 ARG "HUGEPAGES" "NAME;SANITIZERS;TIMEOUT" "COMMAND")
  if(NOT ARG_NAME OR NOT ARG_COMMAND)
    message(FATAL_ERROR "faultline_command_test: NAME and COMMAND are required")
  endif()
  if(ARG_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "faultline_command_test(${ARG_NAME}): unknown arguments ${ARG_UNPARSED_ARGUMENTS}")
  endif()
  _faultline_sanitizer_choice(sanitized faultline_command_test ${ARG_NAME} "${ARG_SANITIZERS}")
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  add_test(NAME ${ARG_NAME} COMMAND ${ARG_COMMAND})
  set_tests_properties(${ARG_NAME} PROPERTIES TIMEOUT ${ARG_TIMEOUT})
  if(ARG_HUGEPAGES)
    set_tests_properties(${ARG_NAME} PROPERTIES RESOURCE_LOCK hugepages)
  endif()
  if(sanitized)
    set_tests_properties(${ARG_NAME} PROPERTIES LABELS sanitizers)
    list(GET ARG_COMMAND 0 program)
    if(TARGET ${program})
      add_dependencies(sanitizer-test-programs ${program})
    endif()
  endif()
  set_property(GLOBAL APPEND PROPERTY FAULTLINE_REGISTERED_TESTS ${ARG_NAME})
endfunction()

function(_faultline_directories dir out)
  set(all ${dir})
  get_property(subdirs DIRECTORY ${dir} PROPERTY SUBDIRECTORIES)
  foreach(sub ${subdirs})
    _faultline_directories(${sub} below)
    list(APPEND all ${below})
  endforeach()
  set(${out} ${all} PARENT_SCOPE)
endfunction()

# Fails configuration when a test bypassed the functions above: an executable
# linking Google Test that faultline_gtest() did not register, or an add_test()
# that faultline_command_test() did not make.
function(faultline_check_test_registrations)
  get_property(programs GLOBAL PROPERTY FAULTLINE_REGISTERED_PROGRAMS)
  get_property(commands GLOBAL PROPERTY FAULTLINE_REGISTERED_TESTS)
  _faultline_directories(${CMAKE_SOURCE_DIR} dirs)
  set(problems "")
  foreach(dir ${dirs})
    get_property(targets DIRECTORY ${dir} PROPERTY BUILDSYSTEM_TARGETS)
    foreach(t ${targets})
      get_target_property(type ${t} TYPE)
      if(NOT type STREQUAL "EXECUTABLE")
        continue()
      endif()
      get_target_property(libs ${t} LINK_LIBRARIES)
      if(libs MATCHES "GTest::" AND NOT t IN_LIST programs)
        string(APPEND problems "\n  test program ${t} (${dir}): register it with faultline_gtest(${t} SANITIZERS YES|NO ...)")
      endif()
    endforeach()
    get_property(tests DIRECTORY ${dir} PROPERTY TESTS)
    foreach(t ${tests})
      if(NOT t IN_LIST commands)
        string(APPEND problems "\n  test ${t} (${dir}): register it with faultline_command_test(NAME ${t} SANITIZERS YES|NO ...)")
      endif()
    endforeach()
  endforeach()
  if(problems)
    message(FATAL_ERROR "tests registered outside cmake/FaultlineTesting.cmake:${problems}")
  endif()
endfunction()
