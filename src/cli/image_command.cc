#include "cli/image_command.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "image/operations.h"
#include "image/transfer.h"
#include "objstore/s3_store.h"

namespace faultline::cli {
namespace {

constexpr const char* kImageFooter = R"(Images are faultline's snapshot format: every guest page is zero, "as in the parent image",
or stored in a zstd-compressed frame; frames are blobs named by their SHA-256 in a store
directory (DIR/blobs/sha256/, manifests in DIR/images/NAME), so identical frames are stored
once. A diff (--parent) stores only the pages whose bytes differ from its parent's.
A store is a directory or an S3 bucket and prefix (--store s3://BUCKET/PREFIX, the same
layout under the prefix; endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION or a profile in ~/.aws/credentials); push and pull copy an
image and its parents between a directory and a bucket, only the blobs the other side lacks.
The format: docs/image-format.md; object stores: docs/object-store.md.)";

// One progress line on stderr, redrawn in place on a terminal and printed at
// most every 2 s otherwise (so logs stay short).
image::Progress progress_line(const std::string& what, bool quiet) {
  if (quiet) return {};
  const bool tty = ::isatty(2) != 0;
  auto last = std::make_shared<std::chrono::steady_clock::time_point>();
  return [what, tty, last](uint64_t done, uint64_t total) {
    const auto now = std::chrono::steady_clock::now();
    const bool finished = done >= total;
    if (!finished && now - *last < (tty ? std::chrono::milliseconds(200) : std::chrono::seconds(2))) return;
    *last = now;
    const double pct = total == 0 ? 100.0 : 100.0 * static_cast<double>(done) / static_cast<double>(total);
    std::fprintf(stderr, tty ? "\r%s: %5.1f %%%s" : "%s: %.1f %%%s", what.c_str(), pct, finished || !tty ? "\n" : "");
  };
}

int report_error(const Error& e) {
  std::fprintf(stderr, "faultline: %s\n", e.describe().c_str());
  return 1;
}

std::string mib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return buf;
}

}  // namespace

struct ImageCommand::Options {
  CLI::App* image = nullptr;
  CLI::App* create = nullptr;
  CLI::App* inspect = nullptr;
  CLI::App* list = nullptr;
  CLI::App* remove = nullptr;
  CLI::App* verify = nullptr;
  CLI::App* flatten = nullptr;
  CLI::App* gc = nullptr;
  CLI::App* push = nullptr;
  CLI::App* pull = nullptr;
  std::string store, name, from, parent, working_set, out, url;
  unsigned threads = 8;
  uint32_t page_size = 4096;
  int level = 3;
  uint32_t frame_pages = 0;
  bool diff_file = false, json = false, quiet = false, dry_run = false;
};

ImageCommand::ImageCommand(CLI::App& app) : options_(std::make_unique<Options>()) {
  Options& o = *options_;
  o.image =
      app.add_subcommand("image", "Create, list, inspect, verify, flatten, delete and garbage-collect snapshot images");
  o.image->require_subcommand(1);
  o.image->footer(kImageFooter);
  auto add_store = [&o](CLI::App* c) {
    c->add_option("--store", o.store, "Store: a directory (blobs/ and images/) or s3://BUCKET/PREFIX")->required();
  };
  auto add_name = [&o](CLI::App* c) { c->add_option("--name", o.name, "Image name (a plain file name)")->required(); };
  auto add_quiet = [&o](CLI::App* c) { c->add_flag("--quiet", o.quiet, "No progress line on stderr"); };

  o.create = o.image->add_subcommand("create", "Create an image from a raw memory file (or a Firecracker Diff file)");
  o.create->add_option("--from", o.from, "Memory file: a Firecracker Full snapshot's memory, or with --diff-file a Diff one")
      ->required()
      ->check(CLI::ExistingFile);
  add_store(o.create);
  add_name(o.create);
  o.create->add_option("--parent", o.parent,
                       "Parent image in the same store: only pages whose bytes differ from it are stored");
  o.create->add_option("--page-size", o.page_size, "Guest page size: 4096 or 2097152 (hugepage guests)")
      ->default_val(4096)
      ->check(CLI::IsMember({4096, 2097152}));
  o.create->add_option("--level", o.level, "zstd compression level")->default_val(3)->check(CLI::Range(1, 19));
  o.create->add_option("--frame-pages", o.frame_pages,
                       "Pages per compressed frame (default: 128 for 4 KiB pages = 512 KiB, 1 for 2 MiB pages)")
      ->check(CLI::Range(1, 16384));
  o.create->add_flag("--diff-file", o.diff_file,
                     "--from is a Firecracker Diff snapshot on top of --parent: holes are 'as in the parent', "
                     "data extents are the pages written since (SEEK_DATA/SEEK_HOLE)");
  o.create->add_option("--working-set", o.working_set,
                       "A working-set file (serve --record): its pages are stored first, in first-touch order")
      ->check(CLI::ExistingFile);
  add_quiet(o.create);

  o.inspect = o.image->add_subcommand("inspect", "Show an image's layers, pages by kind, sizes and compression");
  add_store(o.inspect);
  add_name(o.inspect);
  o.inspect->add_flag("--json", o.json, "One JSON object instead of text");

  o.list =
      o.image->add_subcommand("list", "List a store's images: each one's parent, guest size and what it stores itself");
  add_store(o.list);
  o.list->add_flag("--json", o.json, "One JSON array instead of text");

  o.remove = o.image->add_subcommand(
      "delete",
      "Delete an image (refused while other images have it as their parent, or a daemon serves it, or a flatten, "
      "verify or push reads it); gc then frees its frames");
  add_store(o.remove);
  add_name(o.remove);

  o.verify = o.image->add_subcommand("verify",
                                     "Check every manifest checksum, every ancestor and every frame (present, its "
                                     "SHA-256 and checksum, decompresses)");
  add_store(o.verify);
  add_name(o.verify);
  add_quiet(o.verify);

  o.flatten = o.image->add_subcommand("flatten", "Write an image (its whole chain resolved) as a raw memory file");
  add_store(o.flatten);
  add_name(o.flatten);
  o.flatten->add_option("--out", o.out, "Output file (written atomically; zero pages are holes)")->required();
  add_quiet(o.flatten);

  o.gc = o.image->add_subcommand(
      "gc",
      "Remove blobs no image references and the leases of daemons that died (safe while other processes "
      "create images in the store)");
  add_store(o.gc);
  o.gc->add_flag("--dry-run", o.dry_run, "Count what would be removed, remove nothing");

  auto add_transfer = [&](CLI::App* c, const char* url_help) {
    add_store(c);
    add_name(c);
    c->add_option("url", o.url, url_help)->required();
    c->add_option("--threads", o.threads, "Blobs in flight at once")->default_val(8)->check(CLI::Range(1, 256));
    add_quiet(c);
  };
  o.push = o.image->add_subcommand(
      "push", "Upload an image and its parents to s3://BUCKET/PREFIX: only blobs the bucket lacks, manifests last");
  add_transfer(o.push, "Destination: s3://BUCKET/PREFIX (the bucket is created if missing)");
  o.pull = o.image->add_subcommand(
      "pull", "Download an image and its parents from s3://BUCKET/PREFIX into --store, checking every blob");
  add_transfer(o.pull, "Source: s3://BUCKET/PREFIX");
}

ImageCommand::~ImageCommand() = default;

bool ImageCommand::parsed() const { return options_->image->parsed(); }

int ImageCommand::run() {
  const Options& o = *options_;
  if (o.push->parsed() || o.pull->parsed()) {
    if (!objstore::is_s3_url(o.url)) {
      return report_error(Error{EINVAL, "'" + o.url + "' is not an s3://BUCKET/PREFIX URL"});
    }
    auto local = objstore::open_store(o.store, o.pull->parsed());
    if (!local) return report_error(local.error());
    auto remote = objstore::open_store(o.url, o.push->parsed());
    if (!remote) return report_error(remote.error());
    image::CopyOptions c;
    c.threads = o.threads;
    c.progress = progress_line((o.push->parsed() ? "pushing " : "pulling ") + o.name, o.quiet);
    c.on_lock_wait = [&o] {
      std::fprintf(stderr, "waiting for the lock of %s: a gc or an image delete is running there\n", o.store.c_str());
    };
    const auto start = std::chrono::steady_clock::now();
    auto r = o.push->parsed() ? image::copy_image(**local, **remote, o.name, c)
                              : image::copy_image(**remote, **local, o.name, c);
    if (!r) return report_error(r.error());
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("image %s %s %s: %llu layer(s), %llu new; %llu of %llu blobs copied (%s), the rest already there; "
                "%.1f s\n",
                o.name.c_str(), o.push->parsed() ? "pushed to" : "pulled from", o.url.c_str(),
                static_cast<unsigned long long>(r->layers), static_cast<unsigned long long>(r->manifests_written),
                static_cast<unsigned long long>(r->blobs_copied), static_cast<unsigned long long>(r->blobs),
                mib(r->bytes_copied).c_str(), seconds);
    return 0;
  }
  auto store = objstore::open_store(o.store, o.create->parsed());
  if (!store) return report_error(store.error());

  if (o.create->parsed()) {
    image::CreateOptions c;
    c.memory_path = o.from;
    c.name = o.name;
    if (!o.parent.empty()) c.parent = o.parent;
    c.page_size = o.page_size;
    c.zstd_level = o.level;
    c.frame_pages = o.frame_pages;
    c.diff_file = o.diff_file;
    if (!o.working_set.empty()) c.working_set_path = o.working_set;
    c.progress = progress_line("creating " + o.name, o.quiet);
    const auto start = std::chrono::steady_clock::now();
    auto r = image::create_image(**store, c);
    if (!r) return report_error(r.error());
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("image %s: %llu pages: %llu stored, %llu zero, %llu as in the parent; %llu frames (%llu new), "
                "%s stored, manifest %llu bytes; %.1f s\n",
                o.name.c_str(), static_cast<unsigned long long>(r->guest_pages),
                static_cast<unsigned long long>(r->stored_pages), static_cast<unsigned long long>(r->zero_pages),
                static_cast<unsigned long long>(r->parent_pages), static_cast<unsigned long long>(r->frames),
                static_cast<unsigned long long>(r->frames_written), mib(r->stored_bytes).c_str(),
                static_cast<unsigned long long>(r->manifest_bytes), seconds);
    return 0;
  }
  if (o.inspect->parsed()) {
    auto r = image::inspect_image(**store, o.name);
    if (!r) return report_error(r.error());
    if (o.json) {
      nlohmann::json layers = nlohmann::json::array();
      for (const image::LayerInfo& l : r->layers) {
        layers.push_back({{"name", l.name},
                          {"version", l.version},
                          {"parent", l.parent ? nlohmann::json(*l.parent) : nlohmann::json(nullptr)},
                          {"pages", {{"zero", l.zero_pages}, {"parent", l.parent_pages}, {"stored", l.stored_pages}}},
                          {"frames", l.frames},
                          {"stored_bytes", l.stored_bytes},
                          {"manifest_bytes", l.manifest_bytes},
                          {"version", l.version}});
      }
      nlohmann::json j{{"name", o.name},
                       {"page_size", r->page_size},
                       {"guest_bytes", r->guest_bytes},
                       {"layers", layers},
                       {"pages", {{"zero", r->zero_pages}, {"stored", r->stored_pages}}},
                       {"frames", r->frames},
                       {"stored_bytes", r->stored_bytes},
                       {"unique_bytes", r->unique_bytes},
                       {"uncompressed_bytes", r->uncompressed_bytes},
                       {"compression_ratio", r->compression_ratio}};
      std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
      return 0;
    }
    std::printf("image %s: guest %s in pages of %u bytes, %zu layer(s)\n", o.name.c_str(), mib(r->guest_bytes).c_str(),
                r->page_size, r->layers.size());
    for (const image::LayerInfo& l : r->layers) {
      std::printf(
          "  layer %s (parent: %s): %llu stored, %llu zero, %llu as in the parent; %llu frames, %s, manifest %llu "
          "bytes (version %u)\n",
          l.name.c_str(), l.parent ? l.parent->c_str() : "none", static_cast<unsigned long long>(l.stored_pages),
          static_cast<unsigned long long>(l.zero_pages), static_cast<unsigned long long>(l.parent_pages),
          static_cast<unsigned long long>(l.frames), mib(l.stored_bytes).c_str(),
          static_cast<unsigned long long>(l.manifest_bytes), l.version);
    }
    std::printf("resolved: %llu pages with data, %llu zero\n", static_cast<unsigned long long>(r->stored_pages),
                static_cast<unsigned long long>(r->zero_pages));
    std::printf("frames: %llu distinct; stored %s, unique %s, uncompressed %s, compression ratio %.2f\n",
                static_cast<unsigned long long>(r->frames), mib(r->stored_bytes).c_str(), mib(r->unique_bytes).c_str(),
                mib(r->uncompressed_bytes).c_str(), r->compression_ratio);
    return 0;
  }
  if (o.list->parsed()) {
    auto r = image::list_images(**store);
    if (!r) return report_error(r.error());
    if (o.json) {
      nlohmann::json images = nlohmann::json::array();
      for (const image::ImageListing& l : *r) {
        nlohmann::json j{{"name", l.name}};
        if (l.problem) {
          j["error"] = l.problem->describe();
        } else {
          j.update({{"parent", l.parent ? nlohmann::json(*l.parent) : nlohmann::json(nullptr)},
                    {"page_size", l.page_size},
                    {"guest_bytes", l.guest_bytes},
                    {"stored_pages", l.stored_pages},
                    {"frames", l.frames},
                    {"stored_bytes", l.stored_bytes},
                    {"manifest_bytes", l.manifest_bytes},
                    {"version", l.version}});
        }
        nlohmann::json served_by = nlohmann::json::array();
        for (const image::ImageLease& lease : l.leases) {
          served_by.push_back({{"pid", lease.pid},
                               {"host", lease.host},
                               {"since", lease.since},
                               {"lease", lease.path},
                               {"use", lease.use}});
        }
        j["served_by"] = std::move(served_by);
        images.push_back(std::move(j));
      }
      std::printf("%s\n", images.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    } else {
      for (const image::ImageListing& l : *r) {
        if (l.problem) {
          std::printf("%s: unreadable: %s\n", l.name.c_str(), l.problem->describe().c_str());
          continue;
        }
        // "; served by pid 12 on h, flattened by pid 34 on h"
        std::string served;
        for (const image::ImageLease& lease : l.leases) {
          served += (served.empty() ? "; " : ", ") + lease.use + " by pid " + std::to_string(lease.pid) +
                    (lease.host.empty() ? "" : " on " + lease.host);
        }
        std::printf("%s: parent %s; guest %s in pages of %u bytes; stores %llu pages in %llu frames, %s%s\n",
                    l.name.c_str(), l.parent ? l.parent->c_str() : "none", mib(l.guest_bytes).c_str(), l.page_size,
                    static_cast<unsigned long long>(l.stored_pages), static_cast<unsigned long long>(l.frames),
                    mib(l.stored_bytes).c_str(), served.c_str());
      }
    }
    // An unreadable image is listed, and the command says something is wrong.
    return std::ranges::any_of(*r, [](const image::ImageListing& l) { return l.problem.has_value(); }) ? 1 : 0;
  }
  if (o.remove->parsed()) {
    if (auto st = image::delete_image(**store, o.name); !st) return report_error(st.error());
    if (objstore::is_s3_url(o.store)) {
      std::printf("image %s deleted from %s; its frames stay in the bucket (gc is refused on a bucket)\n",
                  o.name.c_str(), o.store.c_str());
    } else {
      std::printf("image %s deleted from %s; `faultline image gc --store %s` frees the frames no other image uses\n",
                  o.name.c_str(), o.store.c_str(), o.store.c_str());
    }
    return 0;
  }
  if (o.verify->parsed()) {
    auto r = image::verify_image(**store, o.name, progress_line("verifying " + o.name, o.quiet));
    if (!r) return report_error(r.error());
    for (const Error& e : r->problems) std::fprintf(stderr, "faultline: %s\n", e.describe().c_str());
    if (!r->problems.empty()) {
      std::printf("image %s: %zu problem(s) found\n", o.name.c_str(), r->problems.size());
      return 1;
    }
    std::printf("image %s: ok (%llu layers, %llu frames checked)\n", o.name.c_str(),
                static_cast<unsigned long long>(r->layers), static_cast<unsigned long long>(r->frames_checked));
    return 0;
  }
  if (o.flatten->parsed()) {
    const auto start = std::chrono::steady_clock::now();
    auto st = image::flatten_image(**store, o.name, o.out, progress_line("flattening " + o.name, o.quiet));
    if (!st) return report_error(st.error());
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("image %s flattened to %s in %.1f s\n", o.name.c_str(), o.out.c_str(), seconds);
    return 0;
  }
  if (o.gc->parsed()) {
    image::GcOptions g;
    g.dry_run = o.dry_run;
    auto r = image::gc_store(**store, g);
    if (!r) return report_error(r.error());
    std::printf(
        "%s %llu of %llu blobs (%s) referenced by none of %llu images; %llu interrupted writes and %llu stale leases "
        "removed\n",
        o.dry_run ? "would remove" : "removed", static_cast<unsigned long long>(r->removed_blobs),
        static_cast<unsigned long long>(r->blobs), mib(r->removed_bytes).c_str(),
        static_cast<unsigned long long>(r->images), static_cast<unsigned long long>(r->removed_temporaries),
        static_cast<unsigned long long>(r->removed_stale_leases));
    return 0;
  }
  return 0;
}

}  // namespace faultline::cli
