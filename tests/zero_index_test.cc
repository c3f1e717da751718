// The zero-page index is bound to the exact file being served: a memory file
// swapped or rewritten in place under the same name never gets zeros served
// for its data. Every test restores through the Firecracker-faithful client,
// whose Verifier reads the memory file at verification time, so "no
// mismatch" means the guest read the file's current bytes.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <functional>

#include "client/firecracker_client.h"
#include "client/test_memory_file.h"
#include "client/touch.h"
#include "client/verifier.h"
#include "harness.h"
#include "snapshot/zero_index.h"

namespace faultline::testing {
namespace {

constexpr uint64_t kBytes = 16 * kMiB;
constexpr uint64_t kPages = kBytes / 4096;
constexpr double kZeroFraction = 0.3;
constexpr uint64_t kSeedA = 21;
constexpr uint64_t kSeedB = 22;

// A faultline Server on an existing memory file (the harness generates its own).
class Daemon {
 public:
  Daemon(const TempDir& dir, const std::string& memory, const std::string& name)
      : memory_(memory), socket_(dir.file(name + ".sock")), log_path_(dir.file(name + ".log")) {
    log_fd_ = ::open(log_path_.c_str(), O_CREAT | O_WRONLY | O_APPEND | O_CLOEXEC, 0644);
    logger_ = std::make_unique<Logger>(LogFormat::kText, LogLevel::kDebug, log_fd_);
    ServerConfig c;
    c.socket_path = socket_;
    c.memory_path = memory;
    c.on_fatal = OnFatal::kLeave;
    auto s = Server::create(c, *logger_);
    EXPECT_TRUE(s) << s.error().describe();
    if (s) {
      server_ = std::move(*s);
      thread_ = std::thread([this] { (void)server_->run(); });
    }
  }
  ~Daemon() {
    if (server_) server_->stop();
    if (thread_.joinable()) thread_.join();
    ::close(log_fd_);
  }
  std::string log() const { return read_file(log_path_); }
  const std::string& socket() const { return socket_; }
  Server& server() { return *server_; }
  // Blocks (bounded) until `pred` holds; for log lines and session starts.
  bool wait_until(const std::function<bool()>& pred) const {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (std::chrono::steady_clock::now() < deadline) {
      if (pred()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));  // polling daemon state, bounded
    }
    return false;
  }
  bool wait_log(const std::string& needle) const {
    return wait_until([&] { return log().find(needle) != std::string::npos; });
  }
  std::shared_ptr<Session> wait_session(size_t index) {
    EXPECT_TRUE(wait_until([&] { return server_->live_sessions().size() > index; }));
    return server_->session(server_->live_sessions().at(index).id);
  }

 private:
  std::string memory_, socket_, log_path_;
  int log_fd_ = -1;
  std::unique_ptr<Logger> logger_;
  std::unique_ptr<Server> server_;
  std::thread thread_;
};

std::vector<uint64_t> page_offsets(uint64_t first, uint64_t end) {
  std::vector<uint64_t> out;
  for (uint64_t p = first; p < end; ++p) out.push_back(p * 4096);
  return out;
}

// Pages [first, end) that are zero in a file generated with `seed`.
std::vector<uint64_t> zero_pages_of(uint64_t seed, uint64_t first = 0, uint64_t end = kPages) {
  std::vector<uint64_t> out;
  for (uint64_t p = first; p < end; ++p) {
    if (client::test_page_is_zero(p, seed, kZeroFraction)) out.push_back(p);
  }
  return out;
}

// Writes data (a distinct pattern per page) into `pages` of the file, in
// place, through one writable open, and returns nothing until it is on the
// page cache (pwrite).
void write_data_into(const std::string& path, const std::vector<uint64_t>& pages) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  ASSERT_TRUE(fd) << std::strerror(errno);
  std::vector<uint8_t> page(4096);
  for (uint64_t p : pages) {
    client::fill_write_pattern(0xd17a0000 + p, p * 4096, page);
    ASSERT_EQ(::pwrite(fd.get(), page.data(), page.size(), static_cast<off_t>(p * 4096)), 4096);
  }
}

struct stat stat_of(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::stat(path.c_str(), &st), 0);
  return st;
}

// What a careless (or hostile) tool does to hide a rewrite: mtime and atime
// put back. ctime cannot be put back: utimensat itself moves it to now.
void restore_times(const std::string& path, const struct stat& before) {
  const timespec times[2] = {before.st_atim, before.st_mtim};
  ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), times, 0), 0);
  EXPECT_EQ(stat_of(path).st_mtim.tv_nsec, before.st_mtim.tv_nsec);
}

// Connects a v1.14 client, reads `offsets`, and returns the mismatches (every
// byte is checked against the memory file as it is now).
struct Guest {
  Guest(Daemon& d, const std::string& verify_against) {
    auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {kBytes}});
    EXPECT_TRUE(c) << c.error().describe();
    client = std::make_unique<client::FirecrackerClient>(std::move(*c));
    EXPECT_TRUE(client->connect_and_send(d.socket()));
    auto v = client::Verifier::open(verify_against, client->guest_size(), client->page_size());
    EXPECT_TRUE(v) << v.error().describe();
    verifier = std::move(*v);
  }
  uint64_t read(const std::vector<uint64_t>& offsets) {
    auto r = client::touch_pages(*client, *verifier, offsets, client::Access::kRead);
    EXPECT_TRUE(r) << r.error().describe();
    for (const auto& m : verifier->described_mismatches()) ADD_FAILURE() << m.description;
    return r ? r->mismatches : 1;
  }
  std::unique_ptr<client::FirecrackerClient> client;
  std::unique_ptr<client::Verifier> verifier;
};

// Builds MEMORY.zeroidx the way a first daemon run does, then stops.
void build_index_with_a_daemon(const TempDir& dir, const std::string& memory) {
  Daemon first(dir, memory, "first");
  EXPECT_TRUE(first.wait_log("event=zero_index_built")) << first.log();
  EXPECT_TRUE(std::filesystem::exists(memory + ".zeroidx"));
}

TEST(ZeroIndexBinding, FileRewrittenInPlaceWithMtimeRestoredGetsItsNewBytesNotZeros) {
  TempDir dir;
  const std::string mem = dir.file("mem");
  ASSERT_TRUE(client::write_test_memory_file(mem, kBytes, kSeedA, kZeroFraction));
  build_index_with_a_daemon(dir, mem);
  const struct stat before = stat_of(mem);
  const auto zeros = zero_pages_of(kSeedA);
  ASSERT_GT(zeros.size(), kPages / 5);
  write_data_into(mem, zeros);  // data where the index says zero
  restore_times(mem, before);   // same size, inode, mtime: only ctime tells

  Daemon d(dir, mem, "second");
  EXPECT_NE(d.log().find("event=zero_index_built"), std::string::npos) << d.log();
  EXPECT_NE(d.log().find("is stale"), std::string::npos) << d.log();
  EXPECT_NE(d.log().find("ctime_ns"), std::string::npos) << d.log();
  Guest g(d, mem);
  EXPECT_EQ(g.read(page_offsets(0, kPages)), 0u);
  EXPECT_EQ(d.wait_session(0)->summary().counters.snapshot_zero_pages, 0u) << "the file has no zero page left";
}

TEST(ZeroIndexBinding, FileSwappedAfterTheIndexWasBuiltGetsItsOwnBytes) {
  TempDir dir;
  const std::string mem = dir.file("mem");
  ASSERT_TRUE(client::write_test_memory_file(mem, kBytes, kSeedA, kZeroFraction));
  build_index_with_a_daemon(dir, mem);
  const struct stat before = stat_of(mem);
  // The new snapshot: the old one with data in every page the index calls
  // zero, same size and mtime, renamed over the path.
  const std::string fresh = dir.file("mem.new");
  ASSERT_TRUE(client::write_test_memory_file(fresh, kBytes, kSeedA, kZeroFraction));
  write_data_into(fresh, zero_pages_of(kSeedA));
  restore_times(fresh, before);
  ASSERT_EQ(::rename(fresh.c_str(), mem.c_str()), 0);

  Daemon d(dir, mem, "second");
  EXPECT_NE(d.log().find("event=zero_index_built"), std::string::npos) << d.log();
  EXPECT_NE(d.log().find("inode"), std::string::npos) << d.log();
  Guest g(d, mem);
  EXPECT_EQ(g.read(page_offsets(0, kPages)), 0u);
  EXPECT_EQ(d.wait_session(0)->summary().counters.snapshot_zero_pages, 0u);
}

TEST(ZeroIndexBinding, AnIndexWhoseIdentityMatchesButWhoseBitsDoNotIsCaughtBySamplingAndRebuilt) {
  // Identities can collide (a write in the same timestamp tick as the index
  // build, an inode number reused after a delete). Forge that: an index of
  // the old content carrying the rewritten file's identity.
  TempDir dir;
  const std::string mem = dir.file("mem");
  const std::string old_copy = dir.file("mem.old");
  ASSERT_TRUE(client::write_test_memory_file(mem, kBytes, kSeedA, kZeroFraction));
  ASSERT_TRUE(client::write_test_memory_file(old_copy, kBytes, kSeedA, kZeroFraction));
  write_data_into(mem, zero_pages_of(kSeedA));
  {
    auto now = MemoryFile::open(mem);
    auto old = MemoryFile::open(old_copy);
    ASSERT_TRUE(now && old);
    auto id = (*now)->identity();
    ASSERT_TRUE(id);
    auto forged = ZeroIndex::build(**old, *id);
    ASSERT_TRUE(forged) << forged.error().describe();
    ASSERT_GT(forged->zero_pages(), 0u);
    ASSERT_TRUE(forged->save(mem + ".zeroidx"));
  }
  Daemon d(dir, mem, "daemon");
  const std::string log = d.log();
  EXPECT_NE(log.find("event=zero_index_mismatch"), std::string::npos) << log;
  EXPECT_NE(log.find("is listed as all zero but holds data"), std::string::npos) << log;
  EXPECT_NE(log.find("event=zero_index_built"), std::string::npos) << log;
  EXPECT_EQ(log.find("event=zero_index_loaded"), std::string::npos) << log;
  Guest g(d, mem);
  EXPECT_EQ(g.read(page_offsets(0, kPages)), 0u);
  EXPECT_EQ(d.wait_session(0)->summary().counters.snapshot_zero_pages, 0u);
}

TEST(ZeroIndexBinding, AMatchingIndexIsLoadedAfterItsSampleWasChecked) {
  TempDir dir;
  const std::string mem = dir.file("mem");
  ASSERT_TRUE(client::write_test_memory_file(mem, kBytes, kSeedA, kZeroFraction));
  build_index_with_a_daemon(dir, mem);
  Daemon d(dir, mem, "second");
  const std::string log = d.log();
  EXPECT_NE(log.find("event=zero_index_loaded"), std::string::npos) << log;
  EXPECT_NE(log.find("sampled_zero_pages=64 sampled_data_pages=64 guard=lease"), std::string::npos) << log;
  Guest g(d, mem);
  EXPECT_EQ(g.read(page_offsets(0, kPages)), 0u);
  auto session = d.wait_session(0);
  EXPECT_TRUE(d.wait_until([&] {
    return session->summary().counters.snapshot_zero_pages == zero_pages_of(kSeedA).size();
  })) << session->summary().counters.snapshot_zero_pages;
}

TEST(ZeroIndexBinding, FileRewrittenInPlaceWhileServedIsNeverServedZerosForItsData) {
  TempDir dir;
  const std::string mem = dir.file("mem");
  ASSERT_TRUE(client::write_test_memory_file(mem, kBytes, kSeedA, kZeroFraction));
  Daemon d(dir, mem, "daemon");
  ASSERT_NE(d.log().find("guard=lease"), std::string::npos)
      << "writers must wait for the daemon (read lease) on this filesystem: " << d.log();
  Guest g(d, mem);
  // The first half is read from the snapshot as it was, zero pages included.
  EXPECT_EQ(g.read(page_offsets(0, kPages / 2)), 0u);
  auto session = d.wait_session(0);
  // The server counts an install just after the ioctl that woke the guest.
  const uint64_t zeros_before = zero_pages_of(kSeedA, 0, kPages / 2).size();
  ASSERT_TRUE(d.wait_until([&] { return session->summary().counters.snapshot_zero_pages == zeros_before; }));

  // Rewritten in place: data where the second half had zeros, mtime put
  // back. The writer's open() returns only once the daemon has dropped its
  // zero index (the kernel holds it until the lease is released), so the
  // guest may touch the pages right away: no wait, no window.
  const struct stat before = stat_of(mem);
  write_data_into(mem, zero_pages_of(kSeedA, kPages / 2, kPages));
  restore_times(mem, before);
  EXPECT_NE(d.log().find("event=zero_index_disabled"), std::string::npos) << d.log();
  EXPECT_EQ(g.read(page_offsets(kPages / 2, kPages)), 0u) << "the guest must read the new bytes, never zeros";
  EXPECT_EQ(session->summary().counters.snapshot_zero_pages, zeros_before);

  // A VM restored afterwards reads the new file, all of it.
  Guest later(d, mem);
  EXPECT_EQ(later.read(page_offsets(0, kPages)), 0u);
  EXPECT_EQ(d.wait_session(1)->summary().counters.snapshot_zero_pages, 0u);
}

TEST(ZeroIndexBinding, WithAWriterOpenBeforeStartTheIndexIsDisabledByTheFirstWrite) {
  TempDir dir;
  const std::string mem = dir.file("mem");
  ASSERT_TRUE(client::write_test_memory_file(mem, kBytes, kSeedA, kZeroFraction));
  UniqueFd early_writer(::open(mem.c_str(), O_WRONLY | O_CLOEXEC));  // no lease can be had now
  ASSERT_TRUE(early_writer);
  Daemon d(dir, mem, "daemon");
  ASSERT_NE(d.log().find("guard=inotify"), std::string::npos) << d.log();
  ASSERT_NE(d.log().find("open for writing"), std::string::npos) << d.log();
  std::vector<uint8_t> page(4096);
  const auto zeros = zero_pages_of(kSeedA);
  for (uint64_t p : zeros) {
    client::fill_write_pattern(0xd17a0000 + p, p * 4096, page);
    ASSERT_EQ(::pwrite(early_writer.get(), page.data(), page.size(), static_cast<off_t>(p * 4096)), 4096);
  }
  // Without a lease the daemon hears of a write after it happened: the
  // guest connects once the daemon said it stopped using the index.
  ASSERT_TRUE(d.wait_log("event=zero_index_disabled")) << d.log();
  EXPECT_NE(d.log().find("reason=\"the memory file was written\""), std::string::npos) << d.log();
  Guest g(d, mem);
  EXPECT_EQ(g.read(page_offsets(0, kPages)), 0u);
  EXPECT_EQ(d.wait_session(0)->summary().counters.snapshot_zero_pages, 0u);
}

TEST(ZeroIndexBinding, FileSwappedWhileServedKeepsBeingServedFromTheOpenFile) {
  TempDir dir;
  const std::string mem = dir.file("mem");
  const std::string served = dir.file("mem.served");
  ASSERT_TRUE(client::write_test_memory_file(mem, kBytes, kSeedA, kZeroFraction));
  ASSERT_EQ(::link(mem.c_str(), served.c_str()), 0);  // a name the test keeps for the file the daemon opens
  Daemon d(dir, mem, "daemon");
  const std::string fresh = dir.file("mem.new");
  ASSERT_TRUE(client::write_test_memory_file(fresh, kBytes, kSeedB, kZeroFraction));
  ASSERT_EQ(::rename(fresh.c_str(), mem.c_str()), 0);
  ASSERT_TRUE(d.wait_log("event=memory_file_replaced")) << d.log();
  // The daemon serves the file it opened, consistently with its index: a new
  // VM gets the snapshot the daemon was started with (restart it to serve the
  // new one), never a mix of both.
  Guest g(d, served);
  EXPECT_EQ(g.read(page_offsets(0, kPages)), 0u);
  auto session = d.wait_session(0);
  EXPECT_TRUE(d.wait_until([&] {
    return session->summary().counters.snapshot_zero_pages == zero_pages_of(kSeedA).size();
  })) << "the index still describes the open file";
  EXPECT_EQ(d.log().find("event=zero_index_disabled"), std::string::npos) << d.log();
}

}  // namespace
}  // namespace faultline::testing
