#include "image/manifest.h"

#include <zstd.h>

#include <algorithm>
#include <cstring>

#include "common/atomic_file.h"

namespace faultline::image {
namespace {

constexpr char kMagic[8] = {'F', 'L', 'I', 'M', 'G', '\r', '\n', '\x1a'};
constexpr size_t kHeaderBytes = 48;
constexpr size_t kTrailerBytes = 32;

// Run codes in the page map: the low two bits of a run's token.
constexpr uint64_t kCodeZero = 0, kCodeParent = 1, kCodeStoredSequential = 2, kCodeStoredExplicit = 3;

void put_u32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
}
void put_u64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
}
uint32_t get_u32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = v << 8 | p[i];
  return v;
}
uint64_t get_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = v << 8 | p[i];
  return v;
}
// LEB128: 7 bits a byte, low bits first, high bit = more follows.
void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

// A cursor over untrusted bytes: every read is bounds-checked and a failed
// read leaves `ok` false (callers check once per structure).
class Reader {
 public:
  explicit Reader(std::string_view bytes) : p_(reinterpret_cast<const uint8_t*>(bytes.data())), n_(bytes.size()) {}
  bool varint(uint64_t& v) {
    v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= n_) return false;
      const uint8_t b = p_[pos_++];
      // The tenth byte may carry only the top bit of a 64-bit value.
      if (shift == 63 && b > 1) return false;
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  }
  bool bytes(void* out, size_t len) {
    if (len > n_ - pos_) return false;
    std::memcpy(out, p_ + pos_, len);
    pos_ += len;
    return true;
  }
  size_t remaining() const { return n_ - pos_; }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
};

Status check_header_fields(const Manifest& m, const std::string& what) {
  if (m.page_size != kSmallPage && m.page_size != kHugePage) {
    return fail(what + ": page size " + std::to_string(m.page_size) + " is neither 4096 nor 2097152", EINVAL);
  }
  if (m.guest_bytes % m.page_size != 0) {
    return fail(what + ": guest size " + std::to_string(m.guest_bytes) + " is not a whole number of pages", EINVAL);
  }
  if (m.guest_bytes > kMaxGuestBytes) {
    return fail(what + ": guest size " + std::to_string(m.guest_bytes) + " is larger than an image may be (" +
                    std::to_string(kMaxGuestBytes) + " bytes)",
                EINVAL);
  }
  if (m.frame_pages == 0 || static_cast<uint64_t>(m.frame_pages) * m.page_size > kMaxFrameBytes) {
    return fail(what + ": frame size " + std::to_string(m.frame_pages) + " pages is out of range (1.." +
                    std::to_string(kMaxFrameBytes / m.page_size) + ")",
                EINVAL);
  }
  if (m.stored_pages > m.guest_pages()) return fail(what + ": more stored pages than guest pages", EINVAL);
  return {};
}

}  // namespace

Status check_image_name(std::string_view name) {
  if (auto st = check_plain_file_name(name); !st) return st;
  for (char c : name) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) return fail("a name may not contain control characters", EINVAL);
  }
  return {};
}

static Status validate(const Manifest& m, const std::string& what) {
  if (auto st = check_header_fields(m, what); !st) return st;
  if (m.parent) {
    if (auto st = check_image_name(m.parent->name); !st) {
      return fail(what + ": bad parent name: " + st.error().message, EINVAL);
    }
  }
  uint64_t framed = 0;
  for (size_t i = 0; i < m.frames.size(); ++i) {
    const FrameRef& f = m.frames[i];
    if (f.checksum.has_value() != m.frames[0].checksum.has_value()) {
      return fail(what + ": some frames have a checksum and some do not", EINVAL);
    }
    const bool last = i + 1 == m.frames.size();
    if (f.pages == 0 || f.pages > m.frame_pages || (!last && f.pages != m.frame_pages)) {
      return fail(what + ": frame " + std::to_string(i) + " holds " + std::to_string(f.pages) +
                      " pages (every frame but the last holds exactly " + std::to_string(m.frame_pages) + ")",
                  EINVAL);
    }
    const uint64_t bound = ZSTD_compressBound(static_cast<size_t>(f.pages) * m.page_size);
    if (f.compressed_bytes == 0 || f.compressed_bytes > bound) {
      return fail(what + ": frame " + std::to_string(i) + " has an impossible compressed size", EINVAL);
    }
    framed += f.pages;
  }
  if (framed != m.stored_pages) {
    return fail(what + ": frames hold " + std::to_string(framed) + " pages but the image stores " +
                    std::to_string(m.stored_pages),
                EINVAL);
  }
  // The runs must cover the guest exactly, and the stored runs must use each
  // storage index exactly once (sorted and tiled: memory in proportion to the
  // runs, never to a size a hostile header claims).
  uint64_t covered = 0;
  std::vector<std::pair<uint64_t, uint64_t>> stored;
  for (const PageRun& r : m.runs) {
    if (r.pages == 0 || r.pages > m.guest_pages() - covered) {
      return fail(what + ": the page map does not cover the guest exactly", EINVAL);
    }
    covered += r.pages;
    if (r.kind == PageKind::kParent && !m.parent) {
      return fail(what + ": the page map refers to a parent but the image has none", EINVAL);
    }
    if (r.kind == PageKind::kStored) {
      if (r.first_stored >= m.stored_pages || r.pages > m.stored_pages - r.first_stored) {
        return fail(what + ": a stored run points past the image's stored pages", EINVAL);
      }
      stored.emplace_back(r.first_stored, r.pages);
    } else if (r.kind != PageKind::kZero && r.kind != PageKind::kParent) {
      return fail(what + ": unknown page kind", EINVAL);
    }
  }
  if (covered != m.guest_pages()) return fail(what + ": the page map does not cover the guest exactly", EINVAL);
  std::sort(stored.begin(), stored.end());
  uint64_t next = 0;
  for (const auto& [first, pages] : stored) {
    if (first != next) return fail(what + ": stored pages are referenced twice or not at all", EINVAL);
    next += pages;
  }
  if (next != m.stored_pages) return fail(what + ": stored pages are referenced twice or not at all", EINVAL);
  return {};
}

Status validate_manifest(const Manifest& m) { return validate(m, "manifest"); }

uint32_t manifest_version(const Manifest& m) {
  // Version 1 had no checksums; a manifest without them is written as one.
  return !m.frames.empty() && !m.frames[0].checksum ? 1 : kManifestVersion;
}

Result<std::string> serialize_manifest(const Manifest& m) {
  if (auto st = validate(m, "manifest"); !st) return std::unexpected(st.error());
  std::string body;
  if (m.parent) {
    put_varint(body, m.parent->name.size());
    body += m.parent->name;
    body.append(reinterpret_cast<const char*>(m.parent->manifest_sha256.bytes.data()), 32);
  } else {
    put_varint(body, 0);
  }
  const uint32_t version = manifest_version(m);
  put_varint(body, m.frames.size());
  for (const FrameRef& f : m.frames) {
    body.append(reinterpret_cast<const char*>(f.id.bytes.data()), 32);
    if (version >= 2) put_u64(body, *f.checksum);
    put_varint(body, f.compressed_bytes);
    put_varint(body, f.pages);
  }
  // The sequential cursor starts where the first stored run in guest order
  // begins unless the caller laid pages out otherwise (see sequential_start()).
  uint64_t cursor = sequential_start(m);
  put_varint(body, cursor);
  put_varint(body, m.runs.size());
  for (const PageRun& r : m.runs) {
    uint64_t code = r.kind == PageKind::kZero ? kCodeZero : r.kind == PageKind::kParent ? kCodeParent : 0;
    if (r.kind == PageKind::kStored) code = r.first_stored == cursor ? kCodeStoredSequential : kCodeStoredExplicit;
    put_varint(body, r.pages << 2 | code);
    if (code == kCodeStoredExplicit) put_varint(body, r.first_stored);
    if (code == kCodeStoredSequential) cursor += r.pages;
  }
  std::string out(kMagic, sizeof kMagic);
  put_u32(out, version);
  put_u32(out, m.page_size);
  put_u64(out, m.guest_bytes);
  put_u32(out, m.frame_pages);
  put_u32(out, m.zstd_level);
  put_u64(out, m.stored_pages);
  put_u64(out, body.size());
  out += body;
  const BlobId sum = BlobId::of(out);
  out.append(reinterpret_cast<const char*>(sum.bytes.data()), 32);
  return out;
}

uint64_t sequential_start(const Manifest& m) {
  // Pages not moved by a working set are numbered in guest order after the
  // moved ones, so the last stored run in guest order is (almost always) one of
  // them; walking back from it over the sequential tail finds where they start.
  uint64_t start = 0;
  bool found = false;
  for (auto it = m.runs.rbegin(); it != m.runs.rend(); ++it) {
    if (it->kind != PageKind::kStored) continue;
    if (!found) {
      start = it->first_stored;
      found = true;
    } else if (it->first_stored + it->pages == start) {
      start = it->first_stored;
    } else {
      continue;  // a moved run: keeps walking to find earlier sequential ones
    }
  }
  return start;
}

Result<Manifest> parse_manifest(std::string_view bytes, const std::string& what) {
  if (bytes.size() < kHeaderBytes + kTrailerBytes) {
    return fail(what + ": manifest is truncated (" + std::to_string(bytes.size()) + " bytes)", EINVAL);
  }
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  if (std::memcmp(p, kMagic, sizeof kMagic) != 0) return fail(what + ": not an image manifest (bad magic)", EINVAL);
  const uint32_t version = get_u32(p + 8);
  if (version < kOldestManifestVersion || version > kManifestVersion) {
    return fail(what + ": manifest version " + std::to_string(version) + " is not supported (this faultline reads " +
                    std::to_string(kOldestManifestVersion) + " to " + std::to_string(kManifestVersion) + ")",
                EINVAL);
  }
  const uint64_t body_bytes = get_u64(p + 40);
  if (body_bytes != bytes.size() - kHeaderBytes - kTrailerBytes) {
    return fail(what + ": manifest is truncated or has trailing bytes (header says " + std::to_string(body_bytes) +
                    " body bytes, file has " + std::to_string(bytes.size() - kHeaderBytes - kTrailerBytes) + ")",
                EINVAL);
  }
  BlobId stored_sum;
  std::memcpy(stored_sum.bytes.data(), p + bytes.size() - kTrailerBytes, 32);
  if (BlobId::of(bytes.substr(0, bytes.size() - kTrailerBytes)) != stored_sum) {
    return fail(what + ": manifest checksum (SHA-256) does not match: the file is damaged", EINVAL);
  }
  Manifest m;
  m.page_size = get_u32(p + 12);
  m.guest_bytes = get_u64(p + 16);
  m.frame_pages = get_u32(p + 24);
  m.zstd_level = get_u32(p + 28);
  m.stored_pages = get_u64(p + 32);
  if (auto st = check_header_fields(m, what); !st) return std::unexpected(st.error());

  Reader r(bytes.substr(kHeaderBytes, body_bytes));
  auto bad = [&](const char* where) { return fail(what + ": manifest body is malformed (" + where + ")", EINVAL); };
  uint64_t name_len = 0;
  if (!r.varint(name_len) || name_len > 255 || name_len > r.remaining()) return bad("parent name");
  if (name_len > 0) {
    ParentRef parent;
    parent.name.resize(name_len);
    if (!r.bytes(parent.name.data(), name_len) || !r.bytes(parent.manifest_sha256.bytes.data(), 32)) {
      return bad("parent");
    }
    m.parent = std::move(parent);
  }
  uint64_t frame_count = 0;
  // Each frame takes at least 34 bytes (42 with its checksum): a count larger
  // than that is a lie (and must not size an allocation).
  const size_t min_frame_bytes = version >= 2 ? 42 : 34;
  if (!r.varint(frame_count) || frame_count > r.remaining() / min_frame_bytes) return bad("frame count");
  m.frames.resize(frame_count);
  for (FrameRef& f : m.frames) {
    uint64_t pages = 0;
    if (!r.bytes(f.id.bytes.data(), 32)) return bad("frame table");
    if (version >= 2) {
      uint8_t sum[8];
      if (!r.bytes(sum, sizeof sum)) return bad("frame table");
      f.checksum = get_u64(sum);
    }
    if (!r.varint(f.compressed_bytes) || !r.varint(pages) || pages > m.frame_pages) return bad("frame table");
    f.pages = static_cast<uint32_t>(pages);
  }
  uint64_t cursor = 0, run_count = 0;
  if (!r.varint(cursor) || !r.varint(run_count) || run_count > r.remaining()) return bad("page map header");
  m.runs.reserve(run_count);
  for (uint64_t i = 0; i < run_count; ++i) {
    uint64_t token = 0;
    if (!r.varint(token)) return bad("page map");
    PageRun run;
    run.pages = token >> 2;
    switch (token & 3) {
      case kCodeZero: run.kind = PageKind::kZero; break;
      case kCodeParent: run.kind = PageKind::kParent; break;
      case kCodeStoredSequential:
        run.kind = PageKind::kStored;
        run.first_stored = cursor;
        // Overflow here would wrap to a small, valid-looking index.
        if (run.pages > m.stored_pages || cursor > m.stored_pages - run.pages) return bad("sequential run");
        cursor += run.pages;
        break;
      default:
        run.kind = PageKind::kStored;
        if (!r.varint(run.first_stored)) return bad("explicit run");
        break;
    }
    m.runs.push_back(run);
  }
  if (r.remaining() != 0) return bad("trailing bytes in the body");
  if (auto st = validate(m, what); !st) return std::unexpected(st.error());
  return m;
}

}  // namespace faultline::image
