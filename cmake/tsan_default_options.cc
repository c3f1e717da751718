// Linked into every program of a ThreadSanitizer tree (root CMakeLists.txt),
// so that a test run by hand, through ctest or directly, gets the runtime
// options scripts/test.sh gives CI. TSAN_OPTIONS in the environment is
// parsed after these and overrides any of them.
//
// no_huge_pages_for_shadow=0: the runtime otherwise madvises its shadow
// memory MADV_NOHUGEPAGE, and every 4 KiB of shadow a program first touches
// costs a read fault on the zero page, then a copy-on-write fault that
// flushes the TLB of every CPU the process runs on. With huge pages it is one
// fault per 2 MiB: the 602 TSan tests took 373 s against 714 s on a 2-core
// host (scripts/test.sh has the measurement).
extern "C" const char* __tsan_default_options() { return "no_huge_pages_for_shadow=0"; }
