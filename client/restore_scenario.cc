#include "client/restore_scenario.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <set>
#include <thread>

#include "client/byte_size.h"
#include "client/firecracker_client.h"
#include "client/vcpu_touch.h"
#include "client/verifier.h"

namespace faultline::client {

namespace {

// Distinct write tags per phase, so a page written in the wrong phase (or a
// stale page from before a REMOVE) shows up as a mismatch.
constexpr uint64_t kFirstTouchTag = 0x4641554C54310001ull;
constexpr uint64_t kRetouchTag = 0x4641554C54320002ull;

struct Toucher {
  FirecrackerClient& client;
  Verifier& verifier;
  VcpuToucher* vcpus;  // null: host threads only
  const RestoreOptions& options;
};

// Runs `plan` split between host threads and vCPUs; returns totals.
Result<TouchResult> touch_split(Toucher& t, const std::vector<PageTouch>& plan, uint64_t tag,
                                uint64_t& vcpu_pages) {
  std::vector<PageTouch> host_plan, vcpu_plan;
  for (size_t i = 0; i < plan.size(); ++i) {
    const bool to_vcpu = t.vcpus != nullptr && (t.options.threads == 0 || i % 2 == 1);
    (to_vcpu ? vcpu_plan : host_plan).push_back(plan[i]);
  }
  const auto start = std::chrono::steady_clock::now();
  Result<TouchResult> vcpu_result = TouchResult{};
  {
    // vCPUs and host threads run at the same time, on disjoint pages, so the
    // server sees kernel-raised and thread-raised faults interleaved.
    std::jthread vcpu_thread;
    if (!vcpu_plan.empty()) {
      vcpu_thread = std::jthread([&] { vcpu_result = t.vcpus->touch(t.verifier, vcpu_plan, tag); });
    }
    if (!host_plan.empty()) {
      TouchOptions o;
      o.threads = std::max(1, t.options.threads);
      o.sharing = t.options.sharing;
      o.write_tag = tag;
      auto host_result = touch_pages(t.client, t.verifier, host_plan, o);
      if (!host_result) return host_result;
    }
  }
  if (!vcpu_result) return vcpu_result;
  vcpu_pages += vcpu_plan.size();
  TouchResult total;
  total.pages_touched = plan.size();
  total.page_writes = static_cast<uint64_t>(
      std::count_if(plan.begin(), plan.end(), [](const PageTouch& p) { return p.access != Access::kRead; }));
  total.elapsed = std::chrono::steady_clock::now() - start;
  return total;
}

}  // namespace

Result<RestoreReport> run_restore(const RestoreOptions& options) {
  if (options.threads < 0 || options.kvm_vcpus < 0) return fail("thread and vCPU counts cannot be negative");
  if (options.threads == 0 && options.kvm_vcpus == 0) return fail("nothing would touch memory: 0 threads and 0 vCPUs");
  for (double f : {options.touch_fraction, options.write_fraction, options.remove_fraction}) {
    if (!(f >= 0 && f <= 1)) return fail("fractions must be within [0, 1]");
  }
  struct stat st {};
  if (::stat(options.memory_path.c_str(), &st) != 0) {
    return fail_errno("cannot stat memory file " + options.memory_path);
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  ClientConfig config;
  config.version = options.version;
  config.region_sizes = options.region_sizes.empty() ? std::vector<uint64_t>{file_size} : options.region_sizes;
  config.huge_pages = options.huge_pages;
  config.wp_async = options.wp_async;
  const uint64_t regions_total = std::accumulate(config.region_sizes.begin(), config.region_sizes.end(), uint64_t{0});
  // Firecracker's regions are the memory file, back to back: a mismatch here
  // would make the server serve past the file or leave part of it unused.
  if (regions_total != file_size) {
    return fail("region sizes add up to " + std::to_string(regions_total) + " bytes but memory file " +
                options.memory_path + " holds " + std::to_string(file_size));
  }

  if (options.huge_pages && free_huge_pages_2m() * kPageSize2M < file_size) {
    return fail("2 MiB pages: guest memory needs " + std::to_string(file_size / kPageSize2M) +
                " free huge pages but the host has " + std::to_string(free_huge_pages_2m()) +
                " (raise vm.nr_hugepages); without them installs fail and the guest stalls");
  }
  auto client = FirecrackerClient::create(config);
  if (!client) return std::unexpected(client.error());
  auto verifier = Verifier::open(options.memory_path, client->guest_size(), client->page_size());
  if (!verifier) return std::unexpected(verifier.error());

  std::optional<VcpuToucher> vcpus;
  if (options.kvm_vcpus > 0) {
    if (!VcpuToucher::available()) {
      return fail("--kvm-vcpus needs KVM: this build has no client/kvm or /dev/kvm cannot be opened");
    }
    auto created = VcpuToucher::create(*client, options.kvm_vcpus);
    if (!created) return std::unexpected(created.error());
    vcpus.emplace(std::move(*created));
  }

  RestoreReport report;
  report.guest_size = client->guest_size();
  report.page_size = client->page_size();
  report.regions = client->regions().size();
  const auto start = std::chrono::steady_clock::now();
  if (auto s = client->connect_and_send(options.socket_path, options.send_plan); !s) {
    return std::unexpected(s.error());
  }
  Toucher toucher{*client, **verifier, vcpus ? &*vcpus : nullptr, options};
  const uint64_t page_size = client->page_size();
  const uint64_t page_count = client->page_count();

  // Phase 2: first touch.
  const std::vector<uint64_t> touched =
      select_pages(page_count, page_size, options.touch_fraction, options.order, options.seed);
  auto first = touch_split(toucher, plan_touches(touched, options.write_fraction, options.seed + 1),
                           kFirstTouchTag, report.vcpu_pages);
  if (!first) return std::unexpected(first.error());

  // Phase 3: balloon-style removal of random runs of pages. Half the ranges
  // start and end mid-page, to check that only whole pages inside go.
  std::mt19937_64 rng(options.seed + 3);
  const uint64_t target = static_cast<uint64_t>(options.remove_fraction * static_cast<double>(page_count) + 0.5);
  std::set<uint64_t> removed;
  for (uint64_t attempt = 0; removed.size() < target && attempt < 16 * target + 64; ++attempt) {
    const uint64_t run = std::min<uint64_t>(1 + rng() % 16, target - removed.size());
    const uint64_t first_page = rng() % page_count;
    const uint64_t pages = std::min(run, page_count - first_page);
    uint64_t offset = first_page * page_size;
    uint64_t length = pages * page_size;
    if (rng() % 2 == 1 && first_page > 0) {
      offset -= page_size / 2;
      length += page_size;  // still only [first_page, first_page + pages) whole
    }
    auto ranges = client->remove(offset, std::min(length, client->guest_size() - offset));
    if (!ranges) return std::unexpected(ranges.error());
    for (const GuestRange& r : *ranges) {
      for (uint64_t at = r.offset; at < r.offset + r.length; at += page_size) {
        (*verifier)->record_removed(at);
        removed.insert(at);
      }
    }
  }
  report.pages_removed = removed.size();

  // Phase 4: every removed page again; each must read zero.
  std::vector<uint64_t> retouch(removed.begin(), removed.end());
  if (options.order == PageOrder::kRandom) std::shuffle(retouch.begin(), retouch.end(), rng);
  auto second = touch_split(toucher, plan_touches(retouch, options.write_fraction, options.seed + 4),
                            kRetouchTag, report.vcpu_pages);
  if (!second) return std::unexpected(second.error());

  // Phase 5: read back everything touched, from host threads.
  std::set<uint64_t> all(touched.begin(), touched.end());
  all.insert(removed.begin(), removed.end());
  std::vector<uint64_t> final_pages(all.begin(), all.end());
  TouchOptions final_options;
  final_options.threads = std::max(1, options.threads);
  auto final_pass = touch_pages(*client, **verifier, final_pages, Access::kRead, final_options);
  if (!final_pass) return std::unexpected(final_pass.error());

  const auto end = std::chrono::steady_clock::now();
  report.pages_touched = touched.size() + retouch.size();
  report.page_writes = first->page_writes + second->page_writes;
  report.missing_faults = touched.size() + retouch.size();
  report.touch_seconds = std::chrono::duration<double>(first->elapsed + second->elapsed).count();
  report.elapsed_seconds = std::chrono::duration<double>(end - start).count();
  report.pages_verified = (*verifier)->pages_verified();
  report.bytes_verified = (*verifier)->bytes_verified();
  report.mismatches = (*verifier)->mismatches();
  for (const Mismatch& m : (*verifier)->described_mismatches()) report.mismatch_descriptions.push_back(m.description);
  return report;
}

std::string RestoreReport::to_text() const {
  char line[256];
  std::string out;
  std::snprintf(line, sizeof line, "guest memory      %s in %zu region(s), %s pages\n",
                format_byte_size(guest_size).c_str(), regions, format_byte_size(page_size).c_str());
  out += line;
  std::snprintf(line, sizeof line, "pages touched     %llu (%llu by vCPUs, %llu writes), %llu removed\n",
                static_cast<unsigned long long>(pages_touched), static_cast<unsigned long long>(vcpu_pages),
                static_cast<unsigned long long>(page_writes), static_cast<unsigned long long>(pages_removed));
  out += line;
  std::snprintf(line, sizeof line, "verified          %llu page reads, %llu bytes\n",
                static_cast<unsigned long long>(pages_verified), static_cast<unsigned long long>(bytes_verified));
  out += line;
  std::snprintf(line, sizeof line, "mismatches        %llu\n", static_cast<unsigned long long>(mismatches));
  out += line;
  for (const std::string& m : mismatch_descriptions) out += "  " + m + "\n";
  std::snprintf(line, sizeof line, "elapsed           %.3f s (touching %.3f s)\n", elapsed_seconds, touch_seconds);
  out += line;
  std::snprintf(line, sizeof line, "missing faults    %llu, %.0f faults/s (inferred: first touches of non-present pages)\n",
                static_cast<unsigned long long>(missing_faults), faults_per_second());
  out += line;
  return out;
}

std::string RestoreReport::to_json() const {
  nlohmann::ordered_json j;
  j["guest_size"] = guest_size;
  j["page_size"] = page_size;
  j["regions"] = regions;
  j["pages_touched"] = pages_touched;
  j["vcpu_pages"] = vcpu_pages;
  j["page_writes"] = page_writes;
  j["pages_removed"] = pages_removed;
  j["missing_faults"] = missing_faults;
  j["pages_verified"] = pages_verified;
  j["bytes_verified"] = bytes_verified;
  j["mismatches"] = mismatches;
  j["mismatch_descriptions"] = mismatch_descriptions;
  j["elapsed_seconds"] = elapsed_seconds;
  j["touch_seconds"] = touch_seconds;
  j["faults_per_second"] = faults_per_second();
  return j.dump();
}

}  // namespace faultline::client
