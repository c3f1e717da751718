// One daemon, many images: sockets attached and detached at run time
// (Server::attach/detach, the control socket's attach/detach/attachments and
// the CLI), each VM served from what its socket is bound to, every byte
// checked; one frame cache for every image; each refusal with its errno.
// (Images in a bucket attached next to local ones: s3_test.)
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <barrier>
#include <filesystem>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "client/firecracker_client.h"
#include "harness.h"
#include "image/image_chain.h"
#include "image/local_store.h"
#include "image/operations.h"
#include "server/control.h"

namespace faultline::testing {
namespace {

constexpr uint64_t kGuestBytes = 8 * kMiB;

// A copy of `from` with about `fraction` of its pages rewritten.
void write_generation(const std::string& from, const std::string& to, double fraction, uint64_t seed) {
  std::string bytes = read_file(from);
  std::mt19937_64 rng(seed);
  for (uint64_t p = 0; p < bytes.size() / 4096; ++p) {
    if (std::uniform_real_distribution<double>(0, 1)(rng) >= fraction) continue;
    for (uint64_t i = 0; i < 4096; i += 8) {
      const uint64_t v = rng();
      std::memcpy(bytes.data() + p * 4096 + i, &v, 8);
    }
  }
  std::ofstream(to, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

void create(const std::string& store_dir, const std::string& name, const std::string& memory,
            std::optional<std::string> parent = std::nullopt) {
  auto store = image::LocalStore::open(store_dir, true);
  ASSERT_TRUE(store) << store.error().describe();
  image::CreateOptions o;
  o.memory_path = memory;
  o.name = name;
  o.parent = std::move(parent);
  auto r = image::create_image(**store, o);
  ASSERT_TRUE(r) << r.error().describe();
}

Result<client::RestoreReport> restore(const std::string& socket, const std::string& model) {
  client::RestoreOptions o;
  o.socket_path = socket;
  o.memory_path = model;
  o.threads = 2;
  o.touch_fraction = 1.0;
  return client::run_restore(o);
}

// A daemon whose start-up socket serves the harness's memory file ("mem"),
// with a control socket and a socket directory for attach; the store
// DIR/store holds image "gen0" (made from mem) and "gen1" on top of it (made
// from gen1, 10 % of the pages rewritten).
class Attach : public ::testing::Test {
 protected:
  Attach() : h_(options()) {}

  static ServerHarness::Options options() {
    ServerHarness::Options ho;
    ho.memory_bytes = kGuestBytes;
    ho.zero_fraction = 0.2;
    ho.configure = [](ServerConfig& c, const TempDir& d) {
      std::filesystem::create_directory(d.file("vms"));
      c.socket_dir = d.file("vms");
      c.control_path = d.file("control.sock");
      c.max_attachments = 4;
      write_generation(c.memory_path, d.file("gen1"), 0.1, 11);
      create(d.file("store"), "gen0", c.memory_path);
      create(d.file("store"), "gen1", d.file("gen1"), "gen0");
    };
    return ho;
  }
  std::string file(const std::string& name) const { return h_.dir().file(name); }
  std::string vm_socket(const std::string& name) const { return file("vms/" + name); }

  ServerHarness h_;
};

TEST_F(Attach, OneDaemonServesAMemoryFileAndTwoImagesOnThreeSocketsAtOnceEachVmGetsItsOwnBytes) {
  auto a = h_.server().attach({.socket = "gen0.sock", .image = file("store/gen0")});
  ASSERT_TRUE(a) << a.error().describe();
  EXPECT_EQ(a->socket, std::filesystem::canonical(file("vms")).string() + "/gen0.sock");
  EXPECT_EQ(a->serves, file("store/gen0"));
  EXPECT_EQ(a->image_layers, 1u);
  EXPECT_EQ(a->memory_bytes, kGuestBytes);
  auto b = h_.server().attach({.socket = vm_socket("gen1.sock"), .image = file("store/gen1")});
  ASSERT_TRUE(b) << b.error().describe();
  EXPECT_EQ(b->image_layers, 2u);
  struct stat st {};
  ASSERT_EQ(::stat(vm_socket("gen1.sock").c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u) << "attached sockets get the VM socket's mode";
  ASSERT_EQ(h_.server().attachments().size(), 3u);

  // Three VMs at once, one per socket, each checked against its own model.
  auto on_file = std::async(std::launch::async, [&] { return restore(h_.socket(), h_.memory()); });
  auto on_gen0 = std::async(std::launch::async, [&] { return restore(vm_socket("gen0.sock"), h_.memory()); });
  auto on_gen1 = std::async(std::launch::async, [&] { return restore(vm_socket("gen1.sock"), file("gen1")); });
  for (auto* f : {&on_file, &on_gen0, &on_gen1}) {
    auto r = f->get();
    ASSERT_TRUE(r) << r.error().describe();
    EXPECT_EQ(r->mismatches, 0u) << (r->mismatch_descriptions.empty() ? "" : r->mismatch_descriptions[0]);
    EXPECT_GE(r->pages_verified, kGuestBytes / 4096);
  }
  ASSERT_TRUE(h_.wait_ended(3));
  std::map<std::string, std::string> served_on;  // socket -> what its session was served from
  for (const SessionSummary& s : h_.server().finished_sessions()) {
    EXPECT_EQ(s.end, SessionEnd::kSocketClosed) << s.error;
    served_on[s.socket] = s.serves;
  }
  EXPECT_EQ(served_on[h_.socket()], h_.memory());
  EXPECT_EQ(served_on[a->socket], file("store/gen0"));
  EXPECT_EQ(served_on[b->socket], file("store/gen1"));
  // One frame cache for both images: gen1's chain holds gen0's frames, and
  // each distinct frame was loaded once although two VMs read gen0's.
  const auto snap = h_.server().metrics().snapshot();
  ASSERT_TRUE(snap.frame_cache.has_value());
  EXPECT_EQ(snap.frame_cache->misses, frames_in_chain(file("store"), "gen1"));
  for (const auto& att : h_.server().attachments()) EXPECT_EQ(att.connections, 1u) << att.socket;
}

// The control socket writes no file (README, --record-dir): a memory file
// attached through it gets its zero index built in memory, not saved beside
// it as the daemon's own --memory does (found by review: attach wrote
// FILE.zeroidx as the daemon's user wherever FILE's directory was writable).
TEST_F(Attach, AnAttachedMemoryFileGetsNoZeroIndexFileBesideIt) {
  ASSERT_FALSE(std::filesystem::exists(file("gen1.zeroidx")));
  auto a = h_.server().attach({.socket = "gen1-file.sock", .memory = file("gen1")});
  ASSERT_TRUE(a) << a.error().describe();
  auto r = restore(vm_socket("gen1-file.sock"), file("gen1"));
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u) << (r->mismatch_descriptions.empty() ? "" : r->mismatch_descriptions[0]);
  EXPECT_FALSE(std::filesystem::exists(file("gen1.zeroidx")));
  EXPECT_TRUE(eventually_true([&] { return h_.log().find("event=zero_index_not_saved") != std::string::npos; }))
      << h_.log();
  EXPECT_TRUE(std::filesystem::exists(h_.memory() + ".zeroidx")) << "the daemon's own --memory still saves its index";
}

TEST_F(Attach, ADetachedSocketIsGoneAndRefusesNewVmsWhileTheVmConnectedThroughItIsServedOn) {
  auto a = h_.server().attach({.socket = "vm.sock", .image = file("store/gen1")});
  ASSERT_TRUE(a) << a.error().describe();
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {kGuestBytes}});
  ASSERT_TRUE(c) << c.error().describe();
  // Half the guest read before the detach, half after.
  ASSERT_TRUE(c->connect_and_send(vm_socket("vm.sock")));
  ASSERT_TRUE(wait_until([&] { return h_.server().live_sessions().size() == 1; }));
  const std::string model = read_file(file("gen1"));
  ASSERT_EQ(c->guest_size(), model.size());
  const uint64_t half = model.size() / 2;
  EXPECT_EQ(std::memcmp(c->guest_ptr(0), model.data(), half), 0);

  auto d = h_.server().detach("vm.sock");
  ASSERT_TRUE(d) << d.error().describe();
  EXPECT_EQ(d->socket, a->socket);
  EXPECT_EQ(d->connections, 1u);
  // Gone when detach returns: no file, no listener.
  EXPECT_FALSE(std::filesystem::exists(vm_socket("vm.sock")));
  EXPECT_FALSE(try_connect_unix(vm_socket("vm.sock")));
  EXPECT_EQ(h_.server().attachments().size(), 1u);

  EXPECT_EQ(std::memcmp(c->guest_ptr(half), model.data() + half, model.size() - half), 0);
  // The VM still runs from gen1: the daemon's lease keeps a delete (and so
  // a gc) from taking its frames.
  auto store = image::LocalStore::open(file("store"), false);
  ASSERT_TRUE(store);
  auto refused = image::delete_image(**store, "gen1");
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, EBUSY) << refused.error().describe();
  c->close_socket();
  ASSERT_TRUE(h_.wait_ended(1));
  const SessionSummary s = h_.server().finished_sessions().at(0);
  EXPECT_EQ(s.end, SessionEnd::kSocketClosed) << s.error;
  EXPECT_EQ(s.serves, file("store/gen1"));
  // Detached and its last VM gone, the daemon lets go of the image.
  ASSERT_TRUE(wait_until([&] {
    auto leases = (*store)->live_leases(false, nullptr);
    return leases && leases->empty();
  }));
  ASSERT_TRUE(image::delete_image(**store, "gen1"));

  // The name is free again: attached to another image, it serves that one.
  auto again = h_.server().attach({.socket = "vm.sock", .memory = file("gen1")});
  ASSERT_TRUE(again) << again.error().describe();
  EXPECT_NE(again->id, a->id);
  auto r = restore(vm_socket("vm.sock"), file("gen1"));
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u);
  // The start-up socket can be detached like any other.
  ASSERT_TRUE(h_.server().detach(h_.socket()));
  EXPECT_FALSE(std::filesystem::exists(h_.socket()));
}

// Attaches open their image without holding the attach lock: several at
// once for one socket name bind it once and the others are refused as
// taken; several at once for names of their own stop at --max-attachments.
TEST_F(Attach, ConcurrentAttachesOfOneSocketBindItOnceAndTheLimitHolds) {
  constexpr int kThreads = 6;
  // Runs kThreads attaches at once, socket_of(i) naming each one's socket.
  auto attach_at_once = [&](auto socket_of) {
    std::barrier start(kThreads);
    std::vector<std::future<Result<Server::Attachment>>> tries;
    for (int i = 0; i < kThreads; ++i) {
      tries.push_back(std::async(std::launch::async, [&, i] {
        start.arrive_and_wait();
        return h_.server().attach({.socket = socket_of(i), .image = file("store/gen0")});
      }));
    }
    std::vector<Result<Server::Attachment>> out;
    for (auto& t : tries) out.push_back(t.get());
    return out;
  };
  // One name: bound once, every other attach refused as taken.
  int bound = 0;
  for (auto& a : attach_at_once([](int) { return std::string("same.sock"); })) {
    if (a) {
      ++bound;
    } else {
      EXPECT_EQ(a.error().code, EEXIST) << a.error().describe();
    }
  }
  EXPECT_EQ(bound, 1) << "one socket name bound by several attaches";
  EXPECT_TRUE(std::filesystem::exists(vm_socket("same.sock")));
  ASSERT_EQ(h_.server().attachments().size(), 2u);  // the start-up socket and same.sock
  // Names of their own: the limit (4, the start-up socket included) admits
  // exactly two more, whichever two get there first.
  bound = 0;
  for (auto& a : attach_at_once([](int i) { return "own" + std::to_string(i) + ".sock"; })) {
    if (a) {
      ++bound;
    } else {
      EXPECT_EQ(a.error().code, EMFILE) << a.error().describe();
    }
  }
  EXPECT_EQ(bound, 2) << "--max-attachments 4 with two bound before";
  EXPECT_EQ(h_.server().attachments().size(), 4u);
  // A refused attach binds nothing: exactly the admitted names exist.
  int files = 0;
  for (int i = 0; i < kThreads; ++i) files += std::filesystem::exists(vm_socket("own" + std::to_string(i) + ".sock"));
  EXPECT_EQ(files, 2);
}

TEST_F(Attach, EachRefusalSaysWhyAndBindsNothing) {
  auto expect_refused = [&](const Server::AttachRequest& r, int code, const std::string& says) {
    auto a = h_.server().attach(r);
    ASSERT_FALSE(a) << "attach " << r.socket << " was accepted";
    EXPECT_EQ(a.error().code, code) << a.error().describe();
    EXPECT_NE(a.error().describe().find(says), std::string::npos) << a.error().describe();
  };
  // Outside the socket directory, by path or by a name that is a path.
  expect_refused({.socket = file("elsewhere.sock"), .image = file("store/gen0")}, EPERM, "--socket-dir");
  expect_refused({.socket = vm_socket("../x.sock"), .image = file("store/gen0")}, EPERM, "--socket-dir");
  expect_refused({.socket = ".hidden", .image = file("store/gen0")}, EINVAL, "refused");
  // Exactly one of image and memory.
  expect_refused({.socket = "a.sock"}, EINVAL, "exactly one");
  expect_refused({.socket = "a.sock", .image = file("store/gen0"), .memory = h_.memory()}, EINVAL, "exactly one");
  // What is missing is named.
  expect_refused({.socket = "a.sock", .image = file("store/nosuch")}, ENOENT, "nosuch");
  expect_refused({.socket = "a.sock", .memory = file("nosuch.mem")}, ENOENT, "nosuch.mem");
  expect_refused({.socket = "a.sock", .image = file("store/gen0"), .prefetch = file("nosuch.ws")}, ENOENT,
                 "nosuch.ws");
  EXPECT_FALSE(std::filesystem::exists(vm_socket("a.sock")));
  // Never over a socket the daemon listens on.
  ASSERT_TRUE(h_.server().attach({.socket = "a.sock", .image = file("store/gen0")}));
  expect_refused({.socket = "a.sock", .image = file("store/gen1")}, EEXIST, "attached already");
  expect_refused({.socket = vm_socket("a.sock"), .image = file("store/gen1")}, EEXIST, "attached already");
  // At most max_attachments (4, the start-up socket included).
  ASSERT_TRUE(h_.server().attach({.socket = "b.sock", .image = file("store/gen0")}));
  ASSERT_TRUE(h_.server().attach({.socket = "c.sock", .image = file("store/gen0")}));
  expect_refused({.socket = "d.sock", .image = file("store/gen0")}, EMFILE, "--max-attachments");
  EXPECT_FALSE(std::filesystem::exists(vm_socket("d.sock")));
  auto d = h_.server().detach("nosuch.sock");
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().code, ENOENT);
  // Each refusal was logged, the first checks' too; the daemon still serves.
  const std::string log = h_.log();
  size_t logged = 0;
  for (size_t at = 0; (at = log.find("event=attach_failed ", at)) != std::string::npos; ++at) ++logged;
  EXPECT_EQ(logged, 11u) << log;
  expect_served(h_);
}

// Once the daemon stops it binds nothing more: a socket bound then would
// take connections nobody accepts.
TEST_F(Attach, AnAttachOnceTheDaemonStopsIsRefusedAndBindsNothing) {
  h_.server().stop();
  auto a = h_.server().attach({.socket = "late.sock", .image = file("store/gen0")});
  ASSERT_FALSE(a) << "attached after stop()";
  EXPECT_EQ(a.error().code, ESHUTDOWN) << a.error().describe();
  EXPECT_NE(a.error().describe().find("stopping"), std::string::npos) << a.error().describe();
  EXPECT_FALSE(std::filesystem::exists(vm_socket("late.sock")));
  h_.stop();  // run() has returned
  a = h_.server().attach({.socket = "late.sock", .memory = h_.memory()});
  ASSERT_FALSE(a) << "attached after run() returned";
  EXPECT_EQ(a.error().code, ESHUTDOWN) << a.error().describe();
  EXPECT_FALSE(std::filesystem::exists(vm_socket("late.sock")));
  EXPECT_NE(h_.log().find("event=attach_failed socket=late.sock"), std::string::npos) << h_.log();
}

TEST(AttachOff, WithoutASocketDirectoryAttachIsRefused) {
  ServerHarness h;
  auto a = h.server().attach({.socket = "a.sock", .memory = h.memory()});
  ASSERT_FALSE(a);
  EXPECT_EQ(a.error().code, EPERM);
  EXPECT_NE(a.error().describe().find("--socket-dir"), std::string::npos);
}

TEST_F(Attach, TheControlSocketAttachesListsAndDetaches) {
  auto ask = [&](const std::string& line) { return nlohmann::json::parse(handle_control_request(h_.server(), line)); };
  auto attached = ask(R"({"cmd":"attach","socket":"c.sock","image":")" + file("store/gen1") + R"(","prefetch":"all"})");
  ASSERT_FALSE(attached.contains("error")) << attached.dump();
  EXPECT_EQ(attached["serves"], file("store/gen1"));
  EXPECT_EQ(attached["image_layers"], 2);
  EXPECT_EQ(attached["prefetch_all"], true);
  auto listed = ask(R"({"cmd":"attachments"})");
  ASSERT_EQ(listed["attachments"].size(), 2u) << listed.dump();
  EXPECT_EQ(listed["attachments"][1]["socket"], attached["socket"]);
  auto r = restore(vm_socket("c.sock"), file("gen1"));
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u);
  auto refused = ask(R"({"cmd":"attach","socket":"d.sock"})");
  EXPECT_NE(refused.value("error", "").find("exactly one"), std::string::npos) << refused.dump();
  refused = ask(R"({"cmd":"attach","socket":"d.sock","image":7})");
  EXPECT_NE(refused.value("error", "").find("must be a string"), std::string::npos) << refused.dump();
  auto detached = ask(R"({"cmd":"detach","socket":"c.sock"})");
  ASSERT_FALSE(detached.contains("error")) << detached.dump();
  EXPECT_EQ(detached["connections"], 1);
  EXPECT_EQ(ask(R"({"cmd":"attachments"})")["attachments"].size(), 1u);
}

// The daemon as an orchestrator runs it: `faultline serve` with no --socket,
// VMs attached with `faultline attach`, listed, detached, all through the
// CLI in separate processes.
TEST(AttachCli, ADaemonWithoutASocketServesWhatTheCliAttaches) {
  TempDir dir;
  const std::string memory = dir.file("mem");
  ASSERT_TRUE(client::write_test_memory_file(memory, kGuestBytes, 5, 0.2));
  create(dir.file("store"), "base", memory);
  std::filesystem::create_directory(dir.file("vms"));
  const std::string control = dir.file("control.sock");
  const pid_t daemon = spawn({built_binary("faultline"), "serve", "--control", control, "--socket-dir",
                              dir.file("vms"), "--on-fatal", "leave"},
                             dir.file("serve.log"));
  ASSERT_GT(daemon, 0);
  ASSERT_TRUE(eventually_true([&] { return std::filesystem::exists(control); })) << read_file(dir.file("serve.log"));
  auto cli = [&](std::vector<std::string> args, const std::string& out) {
    args.insert(args.begin(), built_binary("faultline"));
    const pid_t p = spawn(args, out);
    return wait_child(p, std::chrono::seconds(30));
  };
  // Relative paths are the CLI's own, made absolute for the daemon.
  const auto cwd = std::filesystem::current_path();
  std::filesystem::current_path(dir.path());
  const int attached = cli({"attach", "--control", control, "--socket", "vm.sock", "--image", "store/base"},
                           dir.file("attach.out"));
  std::filesystem::current_path(cwd);
  ASSERT_TRUE(WIFEXITED(attached) && WEXITSTATUS(attached) == 0) << read_file(dir.file("attach.out"));
  const auto reply = nlohmann::json::parse(read_file(dir.file("attach.out")));
  EXPECT_EQ(reply["serves"], dir.file("store/base"));

  auto r = restore(dir.file("vms/vm.sock"), memory);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u);
  EXPECT_GE(r->pages_verified, kGuestBytes / 4096);

  const int listed = cli({"attachments", "--control", control}, dir.file("list.out"));
  ASSERT_TRUE(WIFEXITED(listed) && WEXITSTATUS(listed) == 0) << read_file(dir.file("list.out"));
  EXPECT_EQ(nlohmann::json::parse(read_file(dir.file("list.out")))["attachments"].size(), 1u);
  const int missing = cli({"attach", "--control", control, "--socket", "x.sock", "--image", dir.file("store/nope")},
                          dir.file("missing.out"));
  EXPECT_TRUE(WIFEXITED(missing) && WEXITSTATUS(missing) == 1);
  EXPECT_NE(read_file(dir.file("missing.out")).find("nope"), std::string::npos) << read_file(dir.file("missing.out"));
  const int detached = cli({"detach", "--control", control, "--socket", "vm.sock"}, dir.file("detach.out"));
  ASSERT_TRUE(WIFEXITED(detached) && WEXITSTATUS(detached) == 0) << read_file(dir.file("detach.out"));
  EXPECT_FALSE(std::filesystem::exists(dir.file("vms/vm.sock")));

  ::kill(daemon, SIGTERM);
  const int status = wait_child(daemon, std::chrono::seconds(30));
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_file(dir.file("serve.log"));
  const std::string log = read_file(dir.file("serve.log"));
  EXPECT_NE(log.find("event=attached"), std::string::npos) << log;
  EXPECT_NE(log.find("event=detached"), std::string::npos) << log;
}

}  // namespace
}  // namespace faultline::testing
