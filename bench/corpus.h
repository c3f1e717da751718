// The realistic memory corpus of faultline-bench's storage table: a guest
// memory file made of the address spaces of real programs, with runs of zero
// pages as a VM has, and the working set those programs touched when they
// were resumed (docs/performance.md, "Realistic corpus").
//
// What goes in (budgets are shares of the corpus size):
//  - a C++ compiler mid-build (cc1plus under `g++ -std=c++23 -O2` compiling
//    this repository's largest source, stopped with SIGSTOP once its resident
//    set has grown to kCompilerStopFactor x its budget), 5/16;
//  - an interpreter with its standard library loaded (Debian's python3 with
//    ~80 stdlib modules imported and an application heap of 60,000 records, a
//    word index and an in-memory sqlite table), waiting for a request, 1/8;
//  - page cache: the files those two read (python's stdlib sources, GCC's C++
//    headers), each file from a page boundary, its tail page zero-filled, 1/16;
//  - zero pages for the rest (1/2): a quarter of them as runs between the
//    chunks of data, the rest as one run at the end.
// Process memory is read from /proc/PID/maps, /proc/PID/pagemap (only pages
// resident in RAM: a guest holds what its programs touched, not what they
// reserved) and /proc/PID/mem. When a process has more resident pages than its
// budget, whole chunks of 64 consecutive resident pages are kept, evenly
// spread over its address space. The chunks of every component are shuffled
// (a fixed seed) before they are laid out: a guest's physical pages of one
// program are scattered among those of others.
//
// Working set: after the dump each process is resumed (the interpreter
// serves 8 requests, the compiler runs on for 500 ms) and its dumped pages
// are read again from /proc/PID/mem after each request (the compiler: in a
// loop, one scan every ~20 ms plus the scan's own time); every page whose
// bytes changed since the dump is appended, scan by scan (address order
// within one scan), the two processes' scans interleaved. That is the order
// in which these programs wrote their memory after a "restore". Reads are
// not visible this way (this kernel has neither soft-dirty bits nor idle
// page tracking), so the set is the written part of the real one.
//
// The bytes differ from run to run (address-space layout, the moment of
// SIGSTOP); the recipe, the sizes and the mix do not.
//
// Thread-safety: one thread; it starts and kills child processes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"

namespace faultline::bench {

struct CorpusOptions {
  uint64_t size = 256ull << 20;  // bytes; a multiple of 1 MiB, at least 8 MiB
  std::string work_dir;          // for the interpreter's script (removed after)
  std::string source_dir;        // this repository (the compiler's input)
  uint64_t seed = 7;             // layout: chunk order and zero-run lengths
};

struct CorpusPart {
  std::string name;      // "compiler", "interpreter", "page cache"
  std::string what;      // how it was taken, one line
  uint64_t pages = 0;    // 4 KiB pages in the corpus
  uint64_t zero_pages = 0;  // of which all-zero (touched zero-filled memory)
  uint64_t resident_pages = 0;  // the process's resident pages when dumped (0 for page cache)
  uint64_t working_set_pages = 0;  // of its pages, how many are in the working set
  uint64_t working_set_ticks = 0;  // scans that found them (requests, compiler scans)
};

struct CorpusReport {
  uint64_t size = 0;
  uint64_t pages = 0;
  uint64_t zero_pages = 0;  // every all-zero page of the file, from any part
  std::vector<CorpusPart> parts;
  uint64_t zero_run_pages = 0;  // pages of the added zero runs
  uint64_t working_set_pages = 0;
  double build_seconds = 0;
};

// Writes the corpus to `out_path` (page size 4096) and its working set to
// `working_set_path` (snapshot/working_set.h format). Fails if the compiler or
// the interpreter cannot be run or read.
Result<CorpusReport> build_realistic_corpus(const CorpusOptions& options, const std::string& out_path,
                                            const std::string& working_set_path);

// One line per part and the totals, for the report and docs.
std::vector<std::string> describe_corpus(const CorpusReport& report);

}  // namespace faultline::bench
