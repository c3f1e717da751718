// Session::page_map(): the dirty query.
#include <algorithm>
#include <nlohmann/json.hpp>

#include "server/session.h"

namespace faultline {

namespace {

void add(std::vector<FileRange>& out, uint64_t offset, uint64_t length) {
  if (!out.empty() && out.back().offset + out.back().length == offset) {
    out.back().length += length;
  } else {
    out.push_back({offset, length});
  }
}

nlohmann::json ranges_json(const std::vector<FileRange>& ranges) {
  nlohmann::json a = nlohmann::json::array();
  for (const FileRange& r : ranges) a.push_back({r.offset, r.length});
  return a;
}

}  // namespace

std::string PageMap::to_json() const {
  nlohmann::ordered_json j;
  j["session"] = session;
  j["pid"] = pid;
  j["method"] = kernel::to_string(method);
  j["write_protect"] = write_protect;
  j["dirty_bytes"] = dirty_bytes;
  j["zero_bytes"] = zero_bytes;
  j["removed_bytes"] = removed_bytes;
  j["dirty"] = ranges_json(dirty);
  j["zero"] = ranges_json(zero);
  j["removed"] = ranges_json(removed);
  return j.dump();
}

Result<PageMap> Session::page_map(bool force_fallback) const {
  PageMap map;
  map.session = config_.id;
  map.pid = handshake_.peer.pid;
  map.write_protect = any_wp_;
  // Segments in file order, so that the ranges come out sorted.
  std::vector<Segment> segments = layout()->segments();
  std::sort(segments.begin(), segments.end(), [](const Segment& a, const Segment& b) { return a.offset < b.offset; });
  for (const Segment& r : segments) {
    auto written = kernel::scan_written_pages(handshake_.peer.pid, r.base, r.size, force_fallback);
    if (!written) return std::unexpected(written.error());
    auto present = kernel::scan_present_pages(handshake_.peer.pid, r.base, r.size, force_fallback);
    if (!present) return std::unexpected(present.error());
    map.method = written->method;
    // Per guest page: a page is written/present if any 4 KiB of it is
    // (hugetlb pages report all their 4 KiB entries alike).
    auto per_page = [&](const std::vector<kernel::AddressRange>& ranges) {
      std::vector<bool> out(r.size / r.page_size, false);
      for (const kernel::AddressRange& a : ranges) {
        for (uint64_t p = (a.start - r.base) / r.page_size; p < out.size() && r.base + p * r.page_size < a.end; ++p) {
          out[p] = true;
        }
      }
      return out;
    };
    const std::vector<bool> dirty = per_page(written->ranges);
    const std::vector<bool> is_present = per_page(present->ranges);
    for (uint64_t p = 0; p < dirty.size(); ++p) {
      const PageState st = pages_->state(r.first_page + p);
      const uint64_t off = r.offset + p * r.page_size;
      // Without WP a write leaves no trace: every present page counts as
      // dirty (conservative, never a lost write). The kernel is the judge of
      // presence: a zero install can be zapped by a REMOVE that was read just
      // before it, so the page-state table alone could call it installed.
      if (dirty[p]) {
        add(map.dirty, off, r.page_size);
        map.dirty_bytes += r.page_size;
      } else if (PageStateTable::serves_zero(st) && is_present[p]) {
        add(map.zero, off, r.page_size);
        map.zero_bytes += r.page_size;
      } else if (PageStateTable::serves_zero(st)) {
        add(map.removed, off, r.page_size);
        map.removed_bytes += r.page_size;
      }
    }
  }
  return map;
}

}  // namespace faultline
