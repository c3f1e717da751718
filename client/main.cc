// faultline-client: a Firecracker-faithful test client for uffd memory
// servers. `generate` writes a deterministic test memory file; `restore`
// does what Firecracker does when it restores a VM with the Uffd backend,
// touches guest memory, balloons some of it away, and checks every byte.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>

#include "client/byte_size.h"
#include "client/restore_scenario.h"
#include "client/test_memory_file.h"
#include "client/version.h"

namespace {

using namespace faultline::client;

int run_generate(const std::string& memory, const std::string& size_text, uint64_t seed, double zero_fraction) {
  auto size = parse_byte_size(size_text);
  if (!size) {
    std::fprintf(stderr, "faultline-client: %s\n", size.error().describe().c_str());
    return 2;
  }
  const auto start = std::chrono::steady_clock::now();
  if (auto s = write_test_memory_file(memory, *size, seed, zero_fraction); !s) {
    std::fprintf(stderr, "faultline-client: %s\n", s.error().describe().c_str());
    return 1;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("wrote %s (%s, seed %llu, zero-page fraction %.3f) in %.2f s (%.0f MB/s)\n", memory.c_str(),
              format_byte_size(*size).c_str(), static_cast<unsigned long long>(seed), zero_fraction, seconds,
              seconds > 0 ? static_cast<double>(*size) / seconds / 1e6 : 0.0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "faultline-client: imitates Firecracker restoring a VM with the Uffd memory backend, against a\n"
      "uffd memory server, and verifies every byte the guest memory returns."};
  app.require_subcommand(1);

  // generate
  std::string gen_memory, gen_size;
  uint64_t gen_seed = 1;
  double gen_zero = 0.1;
  CLI::App* generate = app.add_subcommand(
      "generate", "Write a deterministic test memory file: every 4 KiB page distinct (page index, seed, "
                  "xorshift bytes), a fraction of pages all zero.");
  generate->add_option("--memory", gen_memory, "Memory file to create (truncated if it exists)")->required();
  generate->add_option("--size", gen_size, "File size, a multiple of 4 KiB (e.g. 256M, 1G, 2097152)")->required();
  generate->add_option("--seed", gen_seed, "Seed of the page contents")->capture_default_str();
  generate->add_option("--zero-fraction", gen_zero, "Fraction of pages that are all zero")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();

  // restore
  RestoreOptions o;
  std::string fc_version = "1.14", regions_text, pattern = "sequential";
  bool json = false, identical = false;
  CLI::App* restore = app.add_subcommand(
      "restore",
      "Map guest memory (one MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE mapping per region), create and register "
      "a uffd, connect to the server's socket and send the handshake of the chosen Firecracker version; "
      "then touch pages from host threads and/or KVM vCPUs, madvise(MADV_DONTNEED) some ranges and touch them "
      "again (they must read zero), and read back everything touched. Exits 0 only with 0 mismatches; 1 on "
      "mismatches; 2 on usage or setup errors. Blocks forever if the server stops serving, as Firecracker would.");
  restore->add_option("--socket", o.socket_path, "Unix stream socket the server listens on")->required();
  restore->add_option("--memory", o.memory_path, "Memory snapshot file the server serves (to verify against)")
      ->required();
  restore->add_option("--fc-version", fc_version,
                      "Firecracker version to imitate: 1.1-1.6 send no page size, 1.7-1.11 page_size_kib, 1.12+ "
                      "page_size and page_size_kib; before 1.12 the socket is closed right after sending")
      ->capture_default_str();
  restore->add_flag("--huge-pages", o.huge_pages, "2 MiB hugetlbfs pages (needs vm.nr_hugepages reserved)");
  restore->add_flag("--wp-async", o.wp_async,
                    "Dirty-tracking fork mode: UFFD_FEATURE_WP_ASYNC, regions registered MISSING|WP");
  restore->add_option("--regions", regions_text,
                      "Region sizes, comma-separated (e.g. 64M,32M); must add up to the memory file size "
                      "(default: one region)");
  restore->add_option("--threads", o.threads, "Host threads touching memory (0 allowed with --kvm-vcpus)")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  restore->add_flag("--identical-pages", identical,
                    "All host threads touch the same pages (concurrent faults on one page) instead of disjoint "
                    "slices");
  restore->add_option("--pattern", pattern, "Page order: sequential or random (seeded)")
      ->check(CLI::IsMember({"sequential", "random"}))
      ->capture_default_str();
  restore->add_option("--touch-fraction", o.touch_fraction, "Fraction of guest pages touched")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  restore->add_option("--write-fraction", o.write_fraction, "Fraction of touched pages read, then written")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  restore->add_option("--remove-fraction", o.remove_fraction,
                      "Fraction of guest memory madvise(MADV_DONTNEED)d away, in random runs, then touched again")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  restore->add_option("--kvm-vcpus", o.kvm_vcpus,
                      "KVM vCPUs touching memory as a guest would (0: none); with host threads too, every other "
                      "page goes to the vCPUs")
      ->check(CLI::Range(0, 64))
      ->capture_default_str();
  restore->add_option("--seed", o.seed, "Seed of page selection, order and removals")->capture_default_str();
  restore->add_flag("--json", json, "Print the report as one JSON object");

  CLI11_PARSE(app, argc, argv);

  if (generate->parsed()) return run_generate(gen_memory, gen_size, gen_seed, gen_zero);

  auto version = FirecrackerVersion::parse(fc_version);
  if (!version) {
    std::fprintf(stderr, "faultline-client: %s\n", version.error().describe().c_str());
    return 2;
  }
  o.version = *version;
  if (!regions_text.empty()) {
    auto sizes = parse_byte_size_list(regions_text);
    if (!sizes) {
      std::fprintf(stderr, "faultline-client: --regions: %s\n", sizes.error().describe().c_str());
      return 2;
    }
    o.region_sizes = *sizes;
  }
  o.order = pattern == "random" ? PageOrder::kRandom : PageOrder::kSequential;
  o.sharing = identical ? ThreadSharing::kIdentical : ThreadSharing::kDisjoint;
  auto report = run_restore(o);
  if (!report) {
    std::fprintf(stderr, "faultline-client: %s\n", report.error().describe().c_str());
    return 2;
  }
  std::fputs(json ? (report->to_json() + "\n").c_str() : report->to_text().c_str(), stdout);
  return report->mismatches == 0 ? 0 : 1;
}
