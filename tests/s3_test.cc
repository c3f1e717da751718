// The S3 client and image push/pull against a real Ceph RADOS Gateway on
// 127.0.0.1 (scripts/rgw.sh, a single-node cluster), one that the tests share
// (see S3Test) unless a test stops the gateway. Every byte that went in is
// checked coming out; errors are checked for what they say and for what they
// must not say (a secret key).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <map>
#include <mutex>
#include <random>
#include <set>

#include "capability.h"
#include "client/firecracker_client.h"
#include "client/restore_scenario.h"
#include "client/test_memory_file.h"
#include "client/touch.h"
#include "client/verifier.h"
#include "common/deadline.h"
#include "fault_proxy.h"
#include "harness.h"
#include "image/local_store.h"
#include "image/operations.h"
#include "image/transfer.h"
#include "objstore/s3_client.h"
#include "objstore/s3_store.h"
#include "rgw_cluster.h"
#include "snapshot/working_set.h"

namespace faultline::testing {
namespace {

using objstore::S3Client;
using objstore::S3Config;

bool have_ceph() {
  return std::system("command -v ceph-mon >/dev/null && command -v radosgw >/dev/null") == 0;
}

// The cluster the tests share when no ctest fixture started one (the
// program run by hand): started by the first S3 test, stopped when the last
// has run, and by rgw.sh's watchdog if this process dies first.
class ProcessCluster : public ::testing::Environment {
 public:
  // The cluster's directory; a fatal failure when it does not start.
  static void get(std::string* dir) {
    if (!started_) {
      dir_.emplace();
      const std::string rgw = dir_->path() + "/rgw";
      ASSERT_NE(start_rgw_cluster(rgw, ::getpid(), dir_->path() + "/rgw-start.log"), 0)
          << "scripts/rgw.sh start failed:\n" << read_file(dir_->path() + "/rgw-start.log");
      started_ = true;
    }
    *dir = dir_->path() + "/rgw";
  }
  void TearDown() override {
    if (started_) {
      EXPECT_TRUE(stop_rgw_cluster(dir_->path() + "/rgw"));
    }
    started_ = false;
    dir_.reset();
  }

 private:
  static inline std::optional<TempDir> dir_;
  static inline bool started_ = false;
};
[[maybe_unused]] ::testing::Environment* const process_cluster =
    ::testing::AddGlobalTestEnvironment(new ProcessCluster);

// Every S3 test talks to a real Ceph RADOS Gateway. Starting a cluster takes
// ~5 s, more than most tests run, so the tests share one: the ctest fixture
// `s3_cluster` starts it before the first S3 test of a ctest run and names
// its directory in FAULTLINE_S3_CLUSTER (tests/s3_test_cluster.cc); without
// it, the first test of this process starts one (ProcessCluster). Each test
// keeps to buckets of its own (bucket_name()), so no test sees another's objects,
// whichever ran before or runs beside it. A test that stops the gateway calls
// use_own_cluster() first.
class S3Test : public ::testing::Test {
 protected:
  void SetUp() override {
    FAULTLINE_REQUIRE_CAPABILITY("ceph", have_ceph(),
                                 "ceph-mon or radosgw is not installed (scripts/install-deps.sh installs them)");
    // pid and a count: unique among tests run side by side, one after the
    // other in one cluster, and repeated in one process (--gtest_repeat).
    static int tests_in_this_process = 0;
    bucket_suffix_ = "-" + std::to_string(::getpid()) + "-" + std::to_string(++tests_in_this_process);
    std::string dir;
    if (const char* shared = std::getenv("FAULTLINE_S3_CLUSTER"); shared != nullptr && *shared != '\0') {
      dir = shared;
      ASSERT_NE(rgw_cluster_port(dir), 0) << "no cluster in " << dir
                                          << " (the ctest fixture s3_cluster_start starts it: see its output)";
    } else {
      ASSERT_NO_FATAL_FAILURE(ProcessCluster::get(&dir));
    }
    ASSERT_NO_FATAL_FAILURE(connect(dir));
  }
  void TearDown() override {
    if (own_cluster_) {
      EXPECT_TRUE(stop_rgw_cluster(rgw_dir_));
    }
  }

  // The bucket this test calls `name`: S3 bucket names are global to the
  // cluster, which other tests share.
  std::string bucket_name(const std::string& name) const { return name + bucket_suffix_; }

  // Moves this test onto a cluster of its own, for a test that stops or
  // restarts the gateway (the shared one must keep answering the others).
  void use_own_cluster() {
    const std::string dir = dir_.path() + "/rgw";
    ASSERT_NE(start_rgw_cluster(dir, ::getpid(), dir_.path() + "/rgw-start.log"), 0)
        << "scripts/rgw.sh start failed:\n" << read_file(dir_.path() + "/rgw-start.log");
    own_cluster_ = true;
    ASSERT_NO_FATAL_FAILURE(connect(dir));
  }

  // Points this process (its S3 settings, which the daemons it starts
  // inherit, port_, client_) at the cluster in `dir`.
  void connect(const std::string& dir) {
    rgw_dir_ = dir;
    port_ = rgw_cluster_port(dir);
    ASSERT_TRUE(load_rgw_env(dir)) << "no S3 settings in " << dir << "/env";
    auto config = S3Config::from_environment();
    ASSERT_TRUE(config) << config.error().describe();
    config_ = *config;
    auto c = S3Client::create(config_);
    ASSERT_TRUE(c) << c.error().describe();
    client_ = std::move(*c);
  }

  std::unique_ptr<image::Store> s3_store(const std::string& url, bool create) {
    auto s = objstore::open_store(url, create);
    EXPECT_TRUE(s) << s.error().describe();
    return s ? std::move(*s) : nullptr;
  }

  // A daemon serving the harness's 8 MiB image (16 MiB for 2 MiB pages) from
  // `url`: pushed there from the harness's local store (when `push`), which
  // is then deleted, so every frame must come from the bucket. `endpoint`:
  // where the daemon sends its requests (a FaultProxy), if not the gateway.
  ServerHarness::Options bucket_image(const std::string& url, bool push = true, uint32_t page_size = 4096,
                                      const std::string& endpoint = {},
                                      std::function<void(ServerConfig&)> more = {}) {
    ServerHarness::Options ho;
    ho.memory_bytes = page_size == 4096 ? 8 * kMiB : 16 * kMiB;
    ho.zero_fraction = 0.2;
    ho.serve_image = true;
    ho.image_page_size = page_size;
    ho.configure = [this, url, push, endpoint, more](ServerConfig& c, const TempDir& dir) {
      if (push) {
        auto local = image::LocalStore::open(dir.file("store"), false);
        ASSERT_TRUE(local) << local.error().describe();
        auto bucket = s3_store(url, true);
        ASSERT_TRUE(bucket);
        auto pushed = image::copy_image(**local, *bucket, "base", {});
        ASSERT_TRUE(pushed) << pushed.error().describe();
      }
      std::filesystem::remove_all(dir.file("store"));
      if (!endpoint.empty()) ::setenv("AWS_ENDPOINT_URL", endpoint.c_str(), 1);
      c.image_path = url + "/base";
      if (more) more(c);
    };
    return ho;
  }
  // A VM restore touching every page of the harness's guest: every byte
  // checked against the memory file; the session must end cleanly.
  static void restore_every_byte(ServerHarness& h, bool huge = false) {
    client::RestoreOptions o;
    o.socket_path = h.socket();
    o.memory_path = h.memory();
    o.threads = 2;
    o.touch_fraction = 1.0;
    o.huge_pages = huge;
    auto r = client::run_restore(o);
    ASSERT_TRUE(r) << r.error().describe();
    EXPECT_EQ(r->mismatches, 0u) << (r->mismatch_descriptions.empty() ? "" : r->mismatch_descriptions[0]);
    EXPECT_GT(r->pages_verified, 0u);
    ASSERT_TRUE(h.wait_ended(1));
    const SessionSummary s = h.server().finished_sessions().at(0);
    EXPECT_EQ(s.end, SessionEnd::kSocketClosed) << s.error;
  }

  TempDir dir_;
  std::string rgw_dir_, bucket_suffix_;
  int port_ = 0;
  bool own_cluster_ = false;
  S3Config config_;
  std::shared_ptr<S3Client> client_;
};

std::string random_bytes(size_t n, uint64_t seed) {
  std::string s(n, '\0');
  std::mt19937_64 rng(seed);
  for (auto& ch : s) ch = static_cast<char>(rng());
  return s;
}

TEST_F(S3Test, ObjectsRoundTripWholeAndByRangeAndAreListedAndRemoved) {
  ASSERT_TRUE(client_->create_bucket(bucket_name("fl-objects")));
  ASSERT_TRUE(client_->create_bucket(bucket_name("fl-objects"))) << "creating an existing bucket of ours succeeds";
  const std::string big = random_bytes(3 * 1024 * 1024 + 17, 1);  // above curl's 100-continue threshold
  const std::string small = random_bytes(4096, 2);
  ASSERT_TRUE(client_->put(bucket_name("fl-objects"), "p/a/big", big));
  ASSERT_TRUE(client_->put(bucket_name("fl-objects"), "p/b/small", small));
  ASSERT_TRUE(client_->put(bucket_name("fl-objects"), "q/other", "x"));

  auto whole = client_->get(bucket_name("fl-objects"), "p/a/big");
  ASSERT_TRUE(whole) << whole.error().describe();
  EXPECT_TRUE(*whole == big);
  for (const objstore::ByteRange r : {objstore::ByteRange{0, 1}, objstore::ByteRange{4096, 65536},
                                      objstore::ByteRange{big.size() - 100, 100}}) {
    auto part = client_->get(bucket_name("fl-objects"), "p/a/big", r);
    ASSERT_TRUE(part) << part.error().describe();
    EXPECT_TRUE(*part == big.substr(r.offset, r.length)) << "range " << r.offset << "+" << r.length;
  }
  auto size = client_->head(bucket_name("fl-objects"), "p/b/small");
  ASSERT_TRUE(size) << size.error().describe();
  ASSERT_TRUE(size->has_value());
  EXPECT_EQ(**size, 4096u);

  auto keys = client_->list(bucket_name("fl-objects"), "p/");
  ASSERT_TRUE(keys) << keys.error().describe();
  EXPECT_EQ(*keys, (std::vector<std::string>{"p/a/big", "p/b/small"}));

  ASSERT_TRUE(client_->remove(bucket_name("fl-objects"), "p/b/small"));
  ASSERT_TRUE(client_->remove(bucket_name("fl-objects"), "p/b/small")) << "removing what is gone succeeds";
  auto gone = client_->head(bucket_name("fl-objects"), "p/b/small");
  ASSERT_TRUE(gone);
  EXPECT_FALSE(gone->has_value());
}

TEST_F(S3Test, AListingLongerThanOnePageFollowsTheContinuationToken) {
  ASSERT_TRUE(client_->create_bucket(bucket_name("fl-many")));
  // S3 answers at most 1000 keys per page.
  constexpr int kKeys = 1100;
  for (int i = 0; i < kKeys; ++i) {
    char key[32];
    std::snprintf(key, sizeof key, "k/%05d", i);
    ASSERT_TRUE(client_->put(bucket_name("fl-many"), key, std::to_string(i)));
  }
  auto keys = client_->list(bucket_name("fl-many"), "k/");
  ASSERT_TRUE(keys) << keys.error().describe();
  ASSERT_EQ(keys->size(), static_cast<size_t>(kKeys));
  EXPECT_EQ(keys->front(), "k/00000");
  EXPECT_EQ(keys->back(), "k/01099");
  auto first = client_->list(bucket_name("fl-many"), "k/", 3);
  ASSERT_TRUE(first) << first.error().describe();
  EXPECT_EQ(*first, (std::vector<std::string>{"k/00000", "k/00001", "k/00002"}));
}

TEST_F(S3Test, MissingObjectsBucketsAndWrongCredentialsAreClearErrorsThatNeverShowTheSecret) {
  ASSERT_TRUE(client_->create_bucket(bucket_name("fl-errors")));
  auto missing = client_->get(bucket_name("fl-errors"), "no/such/key");
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code, ENOENT);
  EXPECT_NE(missing.error().message.find("s3://" + bucket_name("fl-errors") + "/no/such/key"), std::string::npos)
      << missing.error().message;
  EXPECT_FALSE(missing.error().retryable);

  auto no_bucket = client_->get(bucket_name("fl-nonexistent"), "k");
  ASSERT_FALSE(no_bucket);
  EXPECT_EQ(no_bucket.error().code, ENOENT);
  EXPECT_NE(no_bucket.error().message.find("bucket '" + bucket_name("fl-nonexistent") + "' does not exist"),
            std::string::npos)
      << no_bucket.error().message;

  S3Config wrong = config_;
  wrong.secret_key = "not-the-secret-0123456789abcdef";
  auto bad = S3Client::create(wrong);
  ASSERT_TRUE(bad);
  auto refused = (*bad)->get(bucket_name("fl-errors"), "k");
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, EACCES);
  EXPECT_NE(refused.error().message.find("refused the credentials"), std::string::npos) << refused.error().message;
  EXPECT_EQ(refused.error().message.find(wrong.secret_key), std::string::npos);
  EXPECT_EQ(refused.error().message.find(config_.secret_key), std::string::npos);
  EXPECT_EQ((*bad)->requests(), 1u) << "a refusal is not retried";

  // The store named in the command line: the same errors, with the image's names.
  ::setenv("AWS_SECRET_ACCESS_KEY", wrong.secret_key.c_str(), 1);
  auto store = objstore::open_store("s3://" + bucket_name("fl-errors") + "/images", false);
  ::setenv("AWS_SECRET_ACCESS_KEY", config_.secret_key.c_str(), 1);
  ASSERT_FALSE(store);
  EXPECT_EQ(store.error().code, EACCES);
  auto no_store = objstore::open_store("s3://" + bucket_name("fl-nonexistent") + "/x", false);
  ASSERT_FALSE(no_store);
  EXPECT_EQ(no_store.error().code, ENOENT);

  // A daemon asked to serve an image the bucket does not hold does not start,
  // and says which image and where.
  ServerConfig c;
  c.socket_path = dir_.path() + "/none.sock";
  c.image_path = "s3://" + bucket_name("fl-errors") + "/images/nope";
  Logger quiet(LogFormat::kText, LogLevel::kError, 2);
  auto server = Server::create(c, quiet);
  ASSERT_FALSE(server);
  EXPECT_EQ(server.error().code, ENOENT);
  EXPECT_NE(server.error().message.find("image nope does not exist"), std::string::npos) << server.error().message;
  EXPECT_NE(server.error().message.find("s3://" + bucket_name("fl-errors") + "/images/images/nope"), std::string::npos)
      << server.error().message;
}

TEST(S3ClientOffline, AnEndpointThatRefusesConnectionsIsRetriedThenReportedRetryable) {
  S3Config c;
  c.endpoint = "http://127.0.0.1:" + std::to_string(free_port_pair());  // nothing listens
  c.access_key = "AKIA";
  c.secret_key = "secret-that-must-not-show";
  c.max_attempts = 3;
  c.first_backoff = std::chrono::milliseconds(1);
  auto client = S3Client::create(c);
  ASSERT_TRUE(client);
  auto r = (*client)->get("bucket", "key");
  ASSERT_FALSE(r);
  EXPECT_TRUE(r.error().retryable);
  EXPECT_EQ(r.error().code, ECONNREFUSED);
  EXPECT_NE(r.error().message.find("after 3 attempts"), std::string::npos) << r.error().message;
  EXPECT_EQ(r.error().message.find(c.secret_key), std::string::npos);
  EXPECT_EQ((*client)->requests(), 3u);
}

TEST(S3ClientOffline, CredentialsComeFromTheEnvironmentOrAProfileOfTheSharedFile) {
  TempDir dir;
  const std::string file = dir.path() + "/credentials";
  std::ofstream(file) << "[default]\naws_access_key_id = DEFAULTKEY\naws_secret_access_key = defaultsecret\n"
                         "\n[ci]\naws_access_key_id=CIKEY\naws_secret_access_key=cisecret\n";
  ::setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1/", 1);
  ::unsetenv("AWS_ACCESS_KEY_ID");
  ::unsetenv("AWS_SECRET_ACCESS_KEY");
  ::unsetenv("AWS_REGION");
  ::setenv("AWS_DEFAULT_REGION", "eu-west-1", 1);
  ::setenv("AWS_SHARED_CREDENTIALS_FILE", file.c_str(), 1);
  ::unsetenv("AWS_PROFILE");
  auto d = S3Config::from_environment();
  ASSERT_TRUE(d) << d.error().describe();
  EXPECT_EQ(d->endpoint, "http://127.0.0.1:1");
  EXPECT_EQ(d->region, "eu-west-1");
  EXPECT_EQ(d->access_key, "DEFAULTKEY");
  EXPECT_EQ(d->secret_key, "defaultsecret");
  ::setenv("AWS_PROFILE", "ci", 1);
  auto ci = S3Config::from_environment();
  ASSERT_TRUE(ci);
  EXPECT_EQ(ci->access_key, "CIKEY");
  ::setenv("AWS_ACCESS_KEY_ID", "ENVKEY", 1);
  ::setenv("AWS_SECRET_ACCESS_KEY", "envsecret", 1);
  auto env = S3Config::from_environment();
  ASSERT_TRUE(env);
  EXPECT_EQ(env->access_key, "ENVKEY");
  ::unsetenv("AWS_ACCESS_KEY_ID");
  ::unsetenv("AWS_SECRET_ACCESS_KEY");
  ::setenv("AWS_PROFILE", "absent", 1);
  auto none = S3Config::from_environment();
  ASSERT_FALSE(none);
  EXPECT_NE(none.error().message.find("profile 'absent'"), std::string::npos) << none.error().message;
  ::unsetenv("AWS_ENDPOINT_URL");
  auto no_endpoint = S3Config::from_environment();
  ASSERT_FALSE(no_endpoint);
  EXPECT_NE(no_endpoint.error().message.find("AWS_ENDPOINT_URL"), std::string::npos);
  for (const char* v : {"AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE"}) ::unsetenv(v);
}

// Multipart uploads. S3 refuses parts under 5 MiB (but the last), so these
// use 5 MiB parts and bodies of 2-3 parts; every request goes through a
// FaultProxy that records what it saw (method and path with query).
class S3MultipartTest : public S3Test {
 protected:
  struct Seen {
    std::string method, path;
  };
  // A client through `proxy` with 5 MiB parts from 6 MiB on.
  std::unique_ptr<S3Client> multipart_client(const FaultProxy& proxy, int max_attempts = 5) {
    S3Config c = config_;
    c.endpoint = proxy.endpoint();
    c.multipart_threshold = 6 * kMiB;
    c.multipart_part_size = 5 * kMiB;
    c.max_attempts = max_attempts;
    c.first_backoff = std::chrono::milliseconds(1);
    auto client = S3Client::create(c);
    EXPECT_TRUE(client) << client.error().describe();
    return client ? std::move(*client) : nullptr;
  }
  // Records every request, then asks `rule` (if any) what to do with it.
  FaultProxy::Rule recording(FaultProxy::Rule rule = {}) {
    return [this, rule](const std::string& method, const std::string& path) {
      {
        std::lock_guard lock(seen_mu_);
        seen_.push_back({method, path});
      }
      return rule ? rule(method, path) : FaultProxy::Decision{};
    };
  }
  // How many recorded requests had `method` and a path containing `part`.
  size_t count(const std::string& method, const std::string& part) {
    std::lock_guard lock(seen_mu_);
    return static_cast<size_t>(std::count_if(seen_.begin(), seen_.end(), [&](const Seen& s) {
      return s.method == method && s.path.find(part) != std::string::npos;
    }));
  }
  void forget_requests() {
    std::lock_guard lock(seen_mu_);
    seen_.clear();
  }

  std::mutex seen_mu_;
  std::vector<Seen> seen_;
};

TEST_F(S3MultipartTest, ABodyAboveTheThresholdGoesUpInPartsAndReadsBackByteForByteAlsoAcrossPartBoundaries) {
  ASSERT_TRUE(client_->create_bucket(bucket_name("fl-multipart")));
  FaultProxy proxy(port_, recording());
  ASSERT_NE(proxy.port(), 0);
  auto client = multipart_client(proxy);
  ASSERT_TRUE(client);
  const std::string body = random_bytes(12 * kMiB + 17, 21);  // parts of 5, 5 and 2 MiB + 17
  ASSERT_TRUE(client->put(bucket_name("fl-multipart"), "big", body));
  EXPECT_EQ(count("POST", "/" + bucket_name("fl-multipart") + "/big?uploads="), 1u);
  for (const std::string n : {"1", "2", "3"})
    EXPECT_EQ(count("PUT", "/" + bucket_name("fl-multipart") + "/big?partNumber=" + n + "&"), 1u) << n;
  EXPECT_EQ(count("PUT", "partNumber=4&"), 0u);
  EXPECT_EQ(count("POST", "/" + bucket_name("fl-multipart") + "/big?uploadId="), 1u);
  EXPECT_EQ(count("PUT", "/" + bucket_name("fl-multipart") + "/big"), 3u) << "the body also went up in one PUT";

  auto whole = client_->get(bucket_name("fl-multipart"), "big");
  ASSERT_TRUE(whole) << whole.error().describe();
  EXPECT_EQ(whole->size(), body.size());
  EXPECT_TRUE(*whole == body);
  auto size = client_->head(bucket_name("fl-multipart"), "big");
  ASSERT_TRUE(size && size->has_value());
  EXPECT_EQ(**size, body.size());
  for (const objstore::ByteRange r :
       {objstore::ByteRange{5 * kMiB - 100, 200}, objstore::ByteRange{10 * kMiB - 1, 2},
        objstore::ByteRange{4 * kMiB, 7 * kMiB}, objstore::ByteRange{body.size() - 5, 5}}) {
    auto part = client_->get(bucket_name("fl-multipart"), "big", r);
    ASSERT_TRUE(part) << part.error().describe();
    EXPECT_TRUE(*part == body.substr(r.offset, r.length)) << "range " << r.offset << "+" << r.length;
  }
  auto unfinished = client_->unfinished_uploads(bucket_name("fl-multipart"), "");
  ASSERT_TRUE(unfinished) << unfinished.error().describe();
  EXPECT_TRUE(unfinished->empty());

  // Just under the threshold: one PUT.
  forget_requests();
  const std::string under = random_bytes(6 * kMiB - 1, 22);
  ASSERT_TRUE(client->put(bucket_name("fl-multipart"), "under", under));
  EXPECT_EQ(count("PUT", "/" + bucket_name("fl-multipart") + "/under"), 1u);
  EXPECT_EQ(count("POST", "/" + bucket_name("fl-multipart") + "/under"), 0u);
  auto got = client_->get(bucket_name("fl-multipart"), "under");
  ASSERT_TRUE(got);
  EXPECT_TRUE(*got == under);
}

// A blob store over a multipart client: a frame-sized blob above the
// threshold is stored under its SHA-256 and reads back with that hash. (The
// ETag of a multipart object is not its bytes' MD5; nothing in faultline
// reads ETags: readers check the bytes against the blob's name.)
TEST_F(S3MultipartTest, ABlobAboveTheThresholdIsStoredInPartsAndReadsBackUnderItsSha256) {
  FaultProxy proxy(port_, recording());
  ASSERT_NE(proxy.port(), 0);
  std::shared_ptr<S3Client> client = multipart_client(proxy);
  ASSERT_TRUE(client);
  auto where = objstore::S3Location::parse("s3://" + bucket_name("fl-multipart-store") + "/images");
  ASSERT_TRUE(where);
  auto store = objstore::S3Store::open(client, *where, true);
  ASSERT_TRUE(store) << store.error().describe();
  const std::string blob = random_bytes(11 * kMiB, 23);
  const image::BlobId id = image::BlobId::of(blob);
  ASSERT_TRUE((*store)->put(id, blob));
  EXPECT_EQ(count("PUT", "partNumber=3&"), 1u);
  EXPECT_EQ(count("POST", "uploadId="), 1u);
  auto got = (*store)->get(id);
  ASSERT_TRUE(got) << got.error().describe();
  EXPECT_TRUE(image::BlobId::of(*got) == id);
  EXPECT_TRUE(*got == blob);
}

TEST_F(S3MultipartTest, APartAnswered503IsRetriedAndTheObjectComesOutRight) {
  ASSERT_TRUE(client_->create_bucket(bucket_name("fl-multipart-retry")));
  std::atomic<int> part2{0};
  auto first_part2_slows_down = [&](const std::string& method, const std::string& path) {
    FaultProxy::Decision d;
    if (method == "PUT" && path.find("partNumber=2&") != std::string::npos && part2.fetch_add(1) == 0) {
      d.action = FaultProxy::Action::kSlowDown;
    }
    return d;
  };
  FaultProxy proxy(port_, recording(first_part2_slows_down));
  ASSERT_NE(proxy.port(), 0);
  auto client = multipart_client(proxy);
  ASSERT_TRUE(client);
  const std::string body = random_bytes(11 * kMiB, 24);
  auto put = client->put(bucket_name("fl-multipart-retry"), "obj", body);
  ASSERT_TRUE(put) << put.error().describe();
  EXPECT_EQ(part2.load(), 2) << "part 2: answered 503 once, then sent again";
  EXPECT_EQ(count("PUT", "partNumber=1&"), 1u);
  EXPECT_EQ(count("PUT", "partNumber=3&"), 1u);
  EXPECT_EQ(count("DELETE", "uploadId="), 0u) << "a retried part aborted the upload";
  auto got = client_->get(bucket_name("fl-multipart-retry"), "obj");
  ASSERT_TRUE(got) << got.error().describe();
  EXPECT_TRUE(*got == body);
  auto unfinished = client_->unfinished_uploads(bucket_name("fl-multipart-retry"), "");
  ASSERT_TRUE(unfinished);
  EXPECT_TRUE(unfinished->empty());
}

// An upload that fails for good (a part, or the completion, answered 503 on
// every attempt) is aborted: the bucket holds neither the object nor an
// unfinished upload. When the abort fails too, the error says the parts
// stay, and the bucket's listing of unfinished uploads shows them.
TEST_F(S3MultipartTest, AnUploadThatFailsForGoodIsAbortedAndLeavesNeitherObjectNorParts) {
  ASSERT_TRUE(client_->create_bucket(bucket_name("fl-multipart-fail")));
  struct Case {
    std::string name, fail_method, fail_path;
    bool abort_fails;
  };
  for (const Case& c : {Case{"part", "PUT", "partNumber=2&", false}, Case{"complete", "POST", "?uploadId=", false},
                        Case{"part-and-abort", "PUT", "partNumber=2&", true}}) {
    SCOPED_TRACE(c.name);
    forget_requests();
    auto always_slows_down = [&](const std::string& method, const std::string& path) {
      FaultProxy::Decision d;
      if (method == c.fail_method && path.find(c.fail_path) != std::string::npos) {
        d.action = FaultProxy::Action::kSlowDown;
      }
      if (c.abort_fails && method == "DELETE") d.action = FaultProxy::Action::kSlowDown;
      return d;
    };
    FaultProxy proxy(port_, recording(always_slows_down));
    ASSERT_NE(proxy.port(), 0);
    auto client = multipart_client(proxy, 3);
    ASSERT_TRUE(client);
    const std::string key = "obj-" + c.name;
    auto put = client->put(bucket_name("fl-multipart-fail"), key, random_bytes(11 * kMiB, 25));
    ASSERT_FALSE(put);
    const std::string& m = put.error().message;
    EXPECT_TRUE(put.error().retryable) << m;
    EXPECT_NE(m.find("multipart upload of s3://" + bucket_name("fl-multipart-fail") + "/" + key), std::string::npos)
        << m;
    EXPECT_NE(m.find("503 SlowDown"), std::string::npos) << m;
    EXPECT_NE(m.find("after 3 attempts"), std::string::npos) << m;
    EXPECT_EQ(m.find(config_.secret_key), std::string::npos);
    if (c.name != "complete") {
      EXPECT_NE(m.find("part 2 of 3"), std::string::npos) << m;
      EXPECT_EQ(count("PUT", "partNumber=2&"), 3u);
    }
    EXPECT_EQ(count("POST", "?uploadId="), c.name == "complete" ? 3u : 0u);
    EXPECT_EQ(count("DELETE", "/" + bucket_name("fl-multipart-fail") + "/" + key + "?uploadId="),
              c.abort_fails ? 3u : 1u);

    auto object = client_->head(bucket_name("fl-multipart-fail"), key);
    ASSERT_TRUE(object) << object.error().describe();
    EXPECT_FALSE(object->has_value()) << "a failed upload left an object";
    auto unfinished = client_->unfinished_uploads(bucket_name("fl-multipart-fail"), key);
    ASSERT_TRUE(unfinished) << unfinished.error().describe();
    if (c.abort_fails) {
      EXPECT_NE(m.find("its parts stay in the bucket"), std::string::npos) << m;
      EXPECT_EQ(*unfinished, std::vector<std::string>{key});
    } else {
      EXPECT_TRUE(unfinished->empty()) << unfinished->size() << " unfinished uploads left";
    }
  }
}

// An upload whose parts the store takes and never answers ends with its
// caller: at the caller's deadline, or when it stops, the parts in flight on
// helper threads included (joining them used to wait for every timeout and
// retry of theirs); then the upload is aborted, past that deadline.
TEST_F(S3MultipartTest, AnUploadEndsWithItsCallerPartsOnHelperThreadsIncludedAndIsAborted) {
  const std::string bucket = bucket_name("fl-multipart-deadline");
  ASSERT_TRUE(client_->create_bucket(bucket));
  std::atomic<int> hung{0};
  FaultProxy proxy(port_, recording([&](const std::string& method, const std::string& path) {
                     FaultProxy::Decision d;
                     if (method == "PUT" && path.find("partNumber=") != std::string::npos) {
                       hung.fetch_add(1);
                       d.action = FaultProxy::Action::kHang;
                     }
                     return d;
                   }));
  ASSERT_NE(proxy.port(), 0);
  auto client = multipart_client(proxy);
  ASSERT_TRUE(client);
  for (const bool by_stop : {false, true}) {
    SCOPED_TRACE(by_stop ? "the caller stops" : "the caller's deadline");
    const std::string key = by_stop ? "stopped" : "late";
    const int before = hung.load();
    std::atomic<bool> stop{false};
    const std::string body = random_bytes(11 * kMiB, 26);  // 3 parts, all at once
    auto put = std::async(std::launch::async, [&] {
      // Room to send every part on a loaded machine, and far below the 50 s
      // a part alone took.
      const auto at = std::chrono::steady_clock::now() +
                      (by_stop ? std::chrono::milliseconds(std::chrono::minutes(5)) : std::chrono::milliseconds(5000));
      const ScopedDeadline scope(at, &stop);
      return client->put(bucket, key, body);
    });
    struct StopOnExit {
      std::atomic<bool>& flag;
      ~StopOnExit() { flag.store(true); }  // a failed ASSERT does not wait for the parts
    } stop_on_exit{stop};
    ASSERT_TRUE(wait_until([&] { return hung.load() >= before + 3; }));  // every part sent, and hanging
    if (by_stop) stop.store(true);
    // Bounded, not timed: a helper's part alone took 5 attempts of 10 s.
    ASSERT_EQ(put.wait_for(std::chrono::seconds(30)), std::future_status::ready) << "a part outlived its caller";
    auto r = put.get();
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, by_stop ? ECANCELED : ETIMEDOUT) << r.error().describe();
    EXPECT_TRUE(r.error().retryable) << r.error().describe();
    EXPECT_EQ(hung.load(), before + 3) << "a part was sent again after its caller gave up";
    EXPECT_EQ(count("DELETE", "/" + bucket + "/" + key + "?uploadId="), 1u) << "the upload was not aborted";
    auto unfinished = client_->unfinished_uploads(bucket, key);
    ASSERT_TRUE(unfinished) << unfinished.error().describe();
    EXPECT_TRUE(unfinished->empty()) << unfinished->size() << " unfinished uploads left";
  }
}

// The store completes the upload but its answer is lost (the connection is
// reset after the gateway answered): the retried completion finds the upload
// gone, and put still succeeds because the object is there, whole. RGW
// answers the repeat with the result once more; AWS answers NoSuchUpload,
// which the proxy gives in the second round: put then checks that the
// object is the one these parts make (its multipart ETag and size).
TEST_F(S3MultipartTest, ACompletionWhoseAnswerIsLostSucceedsAndTheObjectIsRight) {
  for (const bool repeat_no_such_upload : {false, true}) {
    SCOPED_TRACE(repeat_no_such_upload ? "the repeat answered NoSuchUpload (AWS)" : "the gateway's own answer");
    const std::string bucket = bucket_name(repeat_no_such_upload ? "fl-multipart-lost-aws" : "fl-multipart-lost");
    ASSERT_TRUE(client_->create_bucket(bucket));
    std::atomic<int> completions{0};
    auto first_completion_answer_lost = [&](const std::string& method, const std::string& path) {
      FaultProxy::Decision d;
      if (method == "POST" && path.find("?uploadId=") != std::string::npos) {
        const int n = completions.fetch_add(1);
        if (n == 0) d.action = FaultProxy::Action::kLoseAnswer;
        if (n == 1 && repeat_no_such_upload) d.action = FaultProxy::Action::kNoSuchUpload;
      }
      return d;
    };
    FaultProxy proxy(port_, recording(first_completion_answer_lost));
    ASSERT_NE(proxy.port(), 0);
    auto client = multipart_client(proxy);
    ASSERT_TRUE(client);
    const std::string body = random_bytes(11 * kMiB, 26);
    auto put = client->put(bucket, "obj", body);
    ASSERT_TRUE(put) << put.error().describe();
    EXPECT_EQ(completions.load(), 2) << "the completion was not sent again";
    auto got = client_->get(bucket, "obj");
    ASSERT_TRUE(got) << got.error().describe();
    EXPECT_TRUE(*got == body);
    auto unfinished = client_->unfinished_uploads(bucket, "");
    ASSERT_TRUE(unfinished);
    EXPECT_TRUE(unfinished->empty());
  }
}

// A completion answered NoSuchUpload when it did not complete (the upload
// aborted by someone else, or an object of other bytes at the key): put
// fails saying so, and nothing is left behind.
TEST_F(S3MultipartTest, ACompletionAnsweredNoSuchUploadFailsUnlessTheObjectIsTheOneItsPartsMake) {
  for (const bool other_object : {false, true}) {
    SCOPED_TRACE(other_object ? "another object at the key" : "no object at the key");
    const std::string bucket = bucket_name(other_object ? "fl-multipart-gone-other" : "fl-multipart-gone");
    ASSERT_TRUE(client_->create_bucket(bucket));
    if (other_object) {
      ASSERT_TRUE(client_->put(bucket, "obj", random_bytes(11 * kMiB, 28)));  // same size, other bytes
    }
    auto gone = [&](const std::string& method, const std::string& path) {
      FaultProxy::Decision d;
      if (method == "POST" && path.find("?uploadId=") != std::string::npos)
        d.action = FaultProxy::Action::kNoSuchUpload;
      return d;
    };
    FaultProxy proxy(port_, recording(gone));
    ASSERT_NE(proxy.port(), 0);
    auto client = multipart_client(proxy);
    ASSERT_TRUE(client);
    auto put = client->put(bucket, "obj", random_bytes(11 * kMiB, 27));
    ASSERT_FALSE(put);
    EXPECT_EQ(put.error().code, ENOENT) << put.error().describe();
    const std::string& m = put.error().message;
    EXPECT_NE(m.find("no such multipart upload"), std::string::npos) << m;
    EXPECT_NE(m.find(other_object ? "is not the one these parts make" : "no object is there"), std::string::npos) << m;
    auto unfinished = client_->unfinished_uploads(bucket, "");
    ASSERT_TRUE(unfinished);
    EXPECT_TRUE(unfinished->empty()) << "the upload was not aborted";
  }
}

TEST(S3ClientOffline, APartSizeBelowS3sMinimumIsRefused) {
  S3Config c;
  c.endpoint = "http://127.0.0.1:1";
  c.multipart_part_size = 5 * kMiB - 1;
  auto client = S3Client::create(c);
  ASSERT_FALSE(client);
  EXPECT_NE(client.error().message.find("minimum of 5 MiB"), std::string::npos) << client.error().message;
}

// A base image and a diff on top of it, in a local store; returns the
// child's raw memory (what flatten must give back).
std::string make_chain(image::Store& store, const std::string& dir, uint32_t page_size) {
  const uint64_t size = page_size == 4096 ? 8 * kMiB : 16 * kMiB;
  const std::string base = dir + "/base.mem", child = dir + "/child.mem";
  EXPECT_TRUE(client::write_test_memory_file(base, size, 7, 0.25));
  std::string bytes = read_file(base);
  // The child rewrites a few pages.
  for (uint64_t off : {uint64_t{0}, size / 2, size - page_size}) {
    const std::string fresh = random_bytes(page_size, off + 1);
    bytes.replace(off, page_size, fresh);
  }
  std::ofstream(child, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  image::CreateOptions c;
  c.memory_path = base;
  c.name = "base";
  c.page_size = page_size;
  EXPECT_TRUE(image::create_image(store, c));
  c.memory_path = child;
  c.name = "child";
  c.parent = "base";
  EXPECT_TRUE(image::create_image(store, c));
  return bytes;
}

TEST_F(S3Test, PushThenPullRoundTripsEveryByteOfAChainAndASecondPushCopiesNothing) {
  for (const uint32_t page_size : {4096u, 2u * 1024 * 1024}) {
    SCOPED_TRACE(page_size);
    const std::string sub = dir_.path() + "/p" + std::to_string(page_size);
    std::filesystem::create_directories(sub);
    auto local = image::LocalStore::open(sub + "/local", true);
    ASSERT_TRUE(local);
    const std::string child = make_chain(**local, sub, page_size);
    const std::string url = "s3://" + bucket_name("fl-images") + "/fleet/p" + std::to_string(page_size);
    auto bucket = s3_store(url, true);
    ASSERT_TRUE(bucket);

    auto pushed = image::copy_image(**local, *bucket, "child", {});
    ASSERT_TRUE(pushed) << pushed.error().describe();
    EXPECT_EQ(pushed->layers, 2u);
    EXPECT_EQ(pushed->manifests_written, 2u);
    EXPECT_GT(pushed->blobs, 0u);
    EXPECT_EQ(pushed->blobs_copied, pushed->blobs);
    auto again = image::copy_image(**local, *bucket, "child", {});
    ASSERT_TRUE(again) << again.error().describe();
    EXPECT_EQ(again->blobs_copied, 0u) << "the bucket had every blob";
    EXPECT_EQ(again->manifests_written, 0u);

    // The bucket is a store like any other: verify and flatten read it directly.
    auto verified = image::verify_image(*bucket, "child", {});
    ASSERT_TRUE(verified) << verified.error().describe();
    EXPECT_TRUE(verified->problems.empty());
    EXPECT_EQ(verified->layers, 2u);

    auto pulled_to = image::LocalStore::open(sub + "/pulled", true);
    ASSERT_TRUE(pulled_to);
    auto pulled = image::copy_image(*bucket, **pulled_to, "child", {});
    ASSERT_TRUE(pulled) << pulled.error().describe();
    EXPECT_EQ(pulled->blobs_copied, pushed->blobs);
    ASSERT_TRUE(image::flatten_image(**pulled_to, "child", sub + "/flat", {}));
    EXPECT_TRUE(read_file(sub + "/flat") == child) << "flatten of the pulled image differs from the memory file";
    ASSERT_TRUE(image::flatten_image(*bucket, "child", sub + "/flat-s3", {}));
    EXPECT_TRUE(read_file(sub + "/flat-s3") == child) << "flatten straight from the bucket differs";

    // list and delete work on a bucket too: a parent is refused while its
    // child is there, the child goes, and its name is then unknown.
    auto listed = image::list_images(*bucket);
    ASSERT_TRUE(listed) << listed.error().describe();
    ASSERT_EQ(listed->size(), 2u);
    EXPECT_EQ((*listed)[0].name, "base");
    EXPECT_EQ((*listed)[1].name, "child");
    EXPECT_EQ((*listed)[1].parent, std::optional<std::string>("base"));
    EXPECT_EQ((*listed)[1].page_size, page_size);
    auto refused = image::delete_image(*bucket, "base");
    ASSERT_FALSE(refused);
    EXPECT_EQ(refused.error().code, EBUSY) << refused.error().describe();
    ASSERT_TRUE(image::delete_image(*bucket, "child"));
    listed = image::list_images(*bucket);
    ASSERT_TRUE(listed) << listed.error().describe();
    ASSERT_EQ(listed->size(), 1u);
    EXPECT_EQ((*listed)[0].name, "base");
    auto gone = image::delete_image(*bucket, "child");
    ASSERT_FALSE(gone);
    EXPECT_EQ(gone.error().code, ENOENT) << gone.error().describe();
  }
}

TEST_F(S3Test, ADamagedBlobIsNeverPulledAndAnInterruptedPushLeavesNoImage) {
  auto local = image::LocalStore::open(dir_.path() + "/local", true);
  ASSERT_TRUE(local);
  (void)make_chain(**local, dir_.path(), 4096);
  auto bucket = s3_store("s3://" + bucket_name("fl-damage"), true);
  ASSERT_TRUE(bucket);
  ASSERT_TRUE(image::copy_image(**local, *bucket, "child", {}));
  // Overwrite one blob of the bucket with other bytes under the same name.
  auto blobs = bucket->list();
  ASSERT_TRUE(blobs);
  ASSERT_FALSE(blobs->empty());
  const image::BlobId victim = blobs->front();
  ASSERT_TRUE(client_->put(bucket_name("fl-damage"), "blobs/sha256/" + victim.hex(), "not the frame"));
  auto pulled_to = image::LocalStore::open(dir_.path() + "/pulled", true);
  ASSERT_TRUE(pulled_to);
  auto pulled = image::copy_image(*bucket, **pulled_to, "child", {});
  ASSERT_FALSE(pulled);
  EXPECT_EQ(pulled.error().code, EIO);
  EXPECT_NE(pulled.error().message.find(victim.hex()), std::string::npos) << pulled.error().message;
  auto exists = (*pulled_to)->exists(victim);
  ASSERT_TRUE(exists);
  EXPECT_FALSE(*exists) << "the damaged blob was stored";
  auto manifests = (*pulled_to)->list_manifests();
  ASSERT_TRUE(manifests);
  EXPECT_TRUE(manifests->empty()) << "a manifest appeared although its blobs did not all arrive";

  // A push that cannot read one of its blobs stops before any manifest.
  auto other = s3_store("s3://" + bucket_name("fl-damage") + "/other", true);
  ASSERT_TRUE(other);
  auto local_blobs = (*local)->list();
  ASSERT_TRUE(local_blobs);
  ASSERT_TRUE((*local)->remove(local_blobs->back()));
  auto pushed = image::copy_image(**local, *other, "child", {});
  ASSERT_FALSE(pushed);
  EXPECT_EQ(pushed.error().code, ENOENT);
  auto in_bucket = other->list_manifests();
  ASSERT_TRUE(in_bucket);
  EXPECT_TRUE(in_bucket->empty());
}

// `faultline serve --image s3://BUCKET/PREFIX/NAME`: a VM restores straight
// from the bucket (the local store is deleted before the daemon starts), and
// every byte it reads is the memory file's; 4 KiB and 2 MiB pages.
TEST_F(S3Test, AVmRestoresStraightFromTheBucketWithEveryByteChecked) {
  for (const bool huge : {false, true}) {
    SCOPED_TRACE(huge ? "2 MiB pages" : "4 KiB pages");
    std::optional<HugePageReservation> reservation;
    if (huge) {
      reservation.emplace(16);
      FAULTLINE_REQUIRE_CAPABILITY("hugepages", reservation->ok(), reservation->reason());
    }
    ServerHarness h(bucket_image(std::string("s3://" + bucket_name("fl-serve") + "/") + (huge ? "huge" : "small"), true,
                                 huge ? 2 * kMiB : 4096));
    restore_every_byte(h, huge);
    const auto snap = h.server().metrics().snapshot();
    ASSERT_TRUE(snap.frame_cache.has_value());
    EXPECT_GT(snap.frame_cache->misses, 0u);
    EXPECT_EQ(snap.frame_cache->load_failures, 0u);
  }
}

TEST_F(S3Test, SlowDownResetsAndTimeoutsAreRetriedAndTheBytesComeOutRight) {
  ASSERT_TRUE(client_->create_bucket(bucket_name("fl-flaky")));
  const std::string bytes = random_bytes(256 * 1024, 3);
  ASSERT_TRUE(client_->put(bucket_name("fl-flaky"), "obj", bytes));
  // The first four GETs of the object misbehave, one way each; the fifth is forwarded.
  std::atomic<int> gets{0};
  FaultProxy proxy(port_, [&](const std::string& method, const std::string& path) {
    FaultProxy::Decision d;
    if (method != "GET" || path != "/" + bucket_name("fl-flaky") + "/obj") return d;
    switch (gets.fetch_add(1)) {
      case 0: d.action = FaultProxy::Action::kSlowDown; break;
      case 1: d.action = FaultProxy::Action::kReset; break;
      case 2:
        d.action = FaultProxy::Action::kDelay;
        d.delay = std::chrono::milliseconds(1500);  // past the client's request timeout below
        break;
      case 3:
        d.action = FaultProxy::Action::kRequestTimeout;
        break;
      default: break;
    }
    return d;
  });
  ASSERT_NE(proxy.port(), 0);
  S3Config c = config_;
  c.endpoint = proxy.endpoint();
  c.request_timeout = std::chrono::milliseconds(500);
  c.first_backoff = std::chrono::milliseconds(5);
  auto flaky = S3Client::create(c);
  ASSERT_TRUE(flaky);
  auto got = (*flaky)->get(bucket_name("fl-flaky"), "obj");
  ASSERT_TRUE(got) << got.error().describe();
  EXPECT_TRUE(*got == bytes);
  EXPECT_EQ(gets.load(), 5);
  EXPECT_EQ((*flaky)->requests(), 5u);

  // A store that keeps answering 503: the last error says so and is retryable.
  FaultProxy down(port_, [](const std::string&, const std::string&) {
    return FaultProxy::Decision{FaultProxy::Action::kSlowDown, {}};
  });
  c.endpoint = down.endpoint();
  c.max_attempts = 3;
  auto busy = S3Client::create(c);
  ASSERT_TRUE(busy);
  auto refused = (*busy)->get(bucket_name("fl-flaky"), "obj");
  ASSERT_FALSE(refused);
  EXPECT_TRUE(refused.error().retryable);
  EXPECT_NE(refused.error().message.find("503 SlowDown"), std::string::npos) << refused.error().message;
  EXPECT_NE(refused.error().message.find("after 3 attempts"), std::string::npos) << refused.error().message;
}

// Pushing into a bucket that exists needs no CreateBucket: credentials that
// may write objects but not create buckets (or a bucket of another account
// shared for writing) push as well. push used to send CreateBucket first,
// and took the 403 for refused credentials.
TEST_F(S3Test, APushIntoAnExistingBucketNeverAsksToCreateIt) {
  const std::string bucket = bucket_name("fl-no-create");
  ASSERT_TRUE(client_->create_bucket(bucket));
  std::atomic<int> creates{0};
  FaultProxy proxy(port_, [&](const std::string& method, const std::string& path) {
    FaultProxy::Decision d;
    if (method == "PUT" && (path == "/" + bucket || path == "/" + bucket + "/")) {
      creates.fetch_add(1);
      d.action = FaultProxy::Action::kAccessDenied;  // these credentials may not create buckets
    }
    return d;
  });
  ASSERT_NE(proxy.port(), 0);
  ::setenv("AWS_ENDPOINT_URL", proxy.endpoint().c_str(), 1);
  auto pushed = objstore::open_store("s3://" + bucket + "/images", /*create=*/true);
  ::setenv("AWS_ENDPOINT_URL", config_.endpoint.c_str(), 1);
  ASSERT_TRUE(pushed) << pushed.error().describe();
  EXPECT_EQ(creates.load(), 0);
  // A missing bucket is still created by a push.
  ::setenv("AWS_ENDPOINT_URL", proxy.endpoint().c_str(), 1);
  auto missing = objstore::open_store("s3://" + bucket_name("fl-no-create-missing") + "/images", true);
  ::setenv("AWS_ENDPOINT_URL", config_.endpoint.c_str(), 1);
  ASSERT_TRUE(missing) << missing.error().describe();
}

// A GET told how many bytes to expect stops receiving an object that is
// larger (a wrong object under a blob's name must not take its size in
// memory), at once and for good: EFBIG, not retried.
TEST_F(S3Test, AnObjectLargerThanExpectedIsNotReceived) {
  ASSERT_TRUE(client_->create_bucket(bucket_name("fl-large")));
  const std::string bytes = random_bytes(4 << 20, 8);
  ASSERT_TRUE(client_->put(bucket_name("fl-large"), "obj", bytes));
  const uint64_t before = client_->requests();
  auto refused = client_->get(bucket_name("fl-large"), "obj", std::nullopt, 64 << 10);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, EFBIG) << refused.error().describe();
  EXPECT_FALSE(refused.error().retryable);
  EXPECT_NE(refused.error().message.find("more than the 65536 bytes expected"), std::string::npos)
      << refused.error().message;
  EXPECT_EQ(client_->requests(), before + 1);
  auto exact = client_->get(bucket_name("fl-large"), "obj", std::nullopt, bytes.size());
  ASSERT_TRUE(exact) << exact.error().describe();
  EXPECT_TRUE(*exact == bytes);
}

// A thread with a ScopedDeadline (a session serving a fault) gets no
// request, retry or wait past it, and none at all once its flag is set: a
// store that never answers holds it until the deadline, not for every
// timeout and retry (here 5 attempts of 30 s).
TEST_F(S3Test, ARequestGivesUpAtTheCallersDeadlineAndWhenItsFlagIsSet) {
  ASSERT_TRUE(client_->create_bucket(bucket_name("fl-deadline-get")));
  ASSERT_TRUE(client_->put(bucket_name("fl-deadline-get"), "obj", "bytes"));
  FaultProxy proxy(port_, [](const std::string& method, const std::string&) {
    return FaultProxy::Decision{method == "GET" ? FaultProxy::Action::kHang : FaultProxy::Action::kForward, {}};
  });
  ASSERT_NE(proxy.port(), 0);
  S3Config c = config_;
  c.endpoint = proxy.endpoint();
  c.request_timeout = std::chrono::seconds(30);
  c.stall_timeout = std::chrono::seconds(30);
  auto client = S3Client::create(c);
  ASSERT_TRUE(client);
  {
    const ScopedDeadline scope(std::chrono::steady_clock::now() + std::chrono::milliseconds(300));
    auto r = (*client)->get(bucket_name("fl-deadline-get"), "obj");
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().retryable);
    EXPECT_EQ(r.error().code, ETIMEDOUT) << r.error().describe();
    EXPECT_NE(r.error().message.find("stopped at the caller's deadline"), std::string::npos) << r.error().message;
    auto late = (*client)->get(bucket_name("fl-deadline-get"), "obj");  // the deadline has passed: nothing sent
    ASSERT_FALSE(late);
    EXPECT_NE(late.error().message.find("not sent"), std::string::npos) << late.error().message;
  }
  std::atomic<bool> stop{false};
  const uint64_t before = (*client)->requests();
  auto cancelled = std::async(std::launch::async, [&] {
    const ScopedDeadline scope(std::chrono::steady_clock::now() + std::chrono::minutes(5), &stop);
    return (*client)->get(bucket_name("fl-deadline-get"), "obj");
  });
  ASSERT_TRUE(wait_until([&] { return (*client)->requests() > before; }));  // sent, and hanging
  stop.store(true);
  auto r = cancelled.get();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ECANCELED) << r.error().describe();
  // Retryable: the caller stopped, not the store (a thread that waited for
  // this load does not fail for it), and no attempt followed the stop.
  EXPECT_TRUE(r.error().retryable);
  EXPECT_NE(r.error().message.find("the caller is stopping"), std::string::npos) << r.error().message;
  EXPECT_EQ((*client)->requests(), before + 1);
}

// A stop between attempts (the store answered 503 SlowDown, and the caller
// stopped during the backoff before the next attempt): the request ends
// within the backoff's 50 ms slice, and the error says cancelled
// (ECANCELED), not the store's last answer (EAGAIN).
TEST_F(S3Test, ARequestStoppedBetweenAttemptsEndsCancelledNotWithTheStoresLastAnswer) {
  ASSERT_TRUE(client_->create_bucket(bucket_name("fl-cancel-retry")));
  std::atomic<int> gets{0};
  FaultProxy proxy(port_, [&](const std::string& method, const std::string&) {
    FaultProxy::Decision d;
    if (method == "GET") {
      gets.fetch_add(1);
      d.action = FaultProxy::Action::kSlowDown;
    }
    return d;
  });
  ASSERT_NE(proxy.port(), 0);
  S3Config c = config_;
  c.endpoint = proxy.endpoint();
  // The backoff before the second attempt is drawn from 0-20 s: the stop
  // lands in it but for the 1 draw in 400 that is under 50 ms (then it ends
  // the second attempt in flight, also ECANCELED).
  c.first_backoff = std::chrono::seconds(20);
  auto client = S3Client::create(c);
  ASSERT_TRUE(client);
  std::atomic<bool> stop{false};
  const uint64_t before = S3Client::process_totals().requests;  // counts attempts that ended
  auto get = std::async(std::launch::async, [&] {
    const ScopedDeadline scope(std::chrono::steady_clock::now() + std::chrono::minutes(2), &stop);
    return (*client)->get(bucket_name("fl-cancel-retry"), "obj");
  });
  struct StopOnExit {
    std::atomic<bool>& flag;
    ~StopOnExit() { flag.store(true); }
  } stop_on_exit{stop};
  ASSERT_TRUE(wait_until([&] { return S3Client::process_totals().requests > before; }));  // answered 503
  stop.store(true);
  // Bounded, not timed: the backoff alone may be 20 s.
  ASSERT_EQ(get.wait_for(std::chrono::seconds(10)), std::future_status::ready) << "the backoff ignored the stop";
  auto r = get.get();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ECANCELED) << r.error().describe();
  EXPECT_TRUE(r.error().retryable);
  EXPECT_NE(r.error().message.find("stopped: the caller is stopping"), std::string::npos) << r.error().message;
  EXPECT_LE(gets.load(), 2) << "an attempt after the stop";
}

// The wait for a free connection of the pool is bounded the same way: with
// the only connection held by a GET the store never answers, a request
// under a deadline gives up at it without sending anything, and one whose
// flag is set gives up at once (the wait used to last until the held
// request's timeouts and retries freed the connection).
TEST_F(S3Test, AWaitForAFreeConnectionEndsAtTheCallersDeadlineAndWhenItsFlagIsSet) {
  ASSERT_TRUE(client_->create_bucket(bucket_name("fl-deadline-pool")));
  ASSERT_TRUE(client_->put(bucket_name("fl-deadline-pool"), "obj", "bytes"));
  FaultProxy proxy(port_, [](const std::string& method, const std::string&) {
    return FaultProxy::Decision{method == "GET" ? FaultProxy::Action::kHang : FaultProxy::Action::kForward, {}};
  });
  ASSERT_NE(proxy.port(), 0);
  S3Config c = config_;
  c.endpoint = proxy.endpoint();
  c.max_connections = 1;
  c.request_timeout = std::chrono::seconds(30);
  c.stall_timeout = std::chrono::seconds(30);
  auto client = S3Client::create(c);
  ASSERT_TRUE(client);
  std::atomic<bool> stop_holder{false};
  auto holder = std::async(std::launch::async, [&] {
    const ScopedDeadline scope(std::chrono::steady_clock::now() + std::chrono::minutes(2), &stop_holder);
    return (*client)->get(bucket_name("fl-deadline-pool"), "obj");
  });
  struct StopHolder {
    std::atomic<bool>& flag;
    ~StopHolder() { flag.store(true); }  // a failed ASSERT still lets `holder` end
  } stop_on_exit{stop_holder};
  ASSERT_TRUE(wait_until([&] { return (*client)->requests() == 1; }));  // it holds the connection, hanging
  {
    const ScopedDeadline scope(std::chrono::steady_clock::now() + std::chrono::milliseconds(300));
    auto r = (*client)->get(bucket_name("fl-deadline-pool"), "obj");
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, ETIMEDOUT) << r.error().describe();
    EXPECT_TRUE(r.error().retryable);
    EXPECT_NE(r.error().message.find("not sent after waiting for one of the 1 connections"), std::string::npos)
        << r.error().message;
  }
  std::atomic<bool> stop{false};
  auto waiting = std::async(std::launch::async, [&] {
    const ScopedDeadline scope(std::chrono::steady_clock::now() + std::chrono::minutes(2), &stop);
    return (*client)->get(bucket_name("fl-deadline-pool"), "obj");
  });
  // Destroyed before `waiting`: a failed ASSERT ends the holder's GET first,
  // so `waiting`, should it still wait for the connection, ends too.
  StopHolder stop_holder_first{stop_holder};
  stop.store(true);
  // Bounded, not timed: without the flag this waits for the holder's GET.
  ASSERT_EQ(waiting.wait_for(std::chrono::seconds(20)), std::future_status::ready);
  auto r = waiting.get();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ECANCELED) << r.error().describe();
  EXPECT_NE(r.error().message.find("not sent"), std::string::npos) << r.error().message;
  EXPECT_NE(r.error().message.find("the caller is stopping"), std::string::npos) << r.error().message;
  EXPECT_EQ((*client)->requests(), 1u) << "only the holder's GET was sent";
  stop_holder.store(true);
  ASSERT_EQ(holder.wait_for(std::chrono::seconds(20)), std::future_status::ready);
  auto held = holder.get();
  ASSERT_FALSE(held);
  EXPECT_EQ(held.error().code, ECANCELED) << held.error().describe();
}

// Every frame's first GET arrives damaged (one byte of the body flipped):
// each is fetched once more, and the VM gets every byte right.
TEST_F(S3Test, AFrameDamagedOnTheWayIsFetchedOnceMoreAndTheVmGetsEveryByteRight) {
  std::mutex mu;
  std::map<std::string, int> blob_gets;
  FaultProxy proxy(port_, [&](const std::string& method, const std::string& path) {
    FaultProxy::Decision d;
    if (method == "GET" && path.find("/blobs/sha256/") != std::string::npos) {
      std::lock_guard lock(mu);
      if (blob_gets[path]++ == 0) d.action = FaultProxy::Action::kCorruptBody;
    }
    return d;
  });
  ASSERT_NE(proxy.port(), 0);
  ServerHarness h(bucket_image("s3://" + bucket_name("fl-damaged-wire") + "/images", true, 4096, proxy.endpoint()));
  restore_every_byte(h);
  std::lock_guard lock(mu);
  ASSERT_FALSE(blob_gets.empty());
  for (const auto& [path, n] : blob_gets) EXPECT_EQ(n, 2) << path << ": damaged once, fetched twice";
}

// The gateway goes down before the VM touches its memory and comes back
// while faults wait: the VM runs on, every byte right.
TEST_F(S3Test, FaultsWaitWhileTheStoreIsDownAndTheVmRunsOnWhenItReturns) {
  ASSERT_NO_FATAL_FAILURE(use_own_cluster());  // it stops the gateway
  ServerHarness h(bucket_image("s3://" + bucket_name("fl-outage") + "/images"));
  auto session_retries = [&] {
    uint64_t n = 0;
    for (const auto& s : h.server().live_sessions()) n += s.counters.source_retries;
    return n;
  };
  const std::string rgw = std::string("bash ") + FAULTLINE_SOURCE_DIR + "/scripts/rgw.sh ";
  ASSERT_EQ(std::system((rgw + "gateway-stop " + rgw_dir_).c_str()), 0);
  client::RestoreOptions o;
  o.socket_path = h.socket();
  o.memory_path = h.memory();
  o.threads = 2;
  o.touch_fraction = 1.0;
  auto restore = std::async(std::launch::async, [&] { return client::run_restore(o); });
  ASSERT_TRUE(wait_until([&] { return session_retries() > 0; }))
      << "no fault was retried while the gateway was down";
  ASSERT_EQ(std::system((rgw + "gateway-start " + rgw_dir_ + " >/dev/null").c_str()), 0);
  auto r = restore.get();
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u) << (r->mismatch_descriptions.empty() ? "" : r->mismatch_descriptions[0]);
  ASSERT_TRUE(h.wait_ended(1));
  const SessionSummary s = h.server().finished_sessions().at(0);
  EXPECT_EQ(s.end, SessionEnd::kSocketClosed) << s.error;
  EXPECT_GT(s.counters.source_retries, 0u);
}

// `serve --cache-dir`: the first daemon fetches each frame from the bucket
// once and keeps it on local disk; a second daemon started over that cache
// (a restart) fetches no frame at all. Every byte checked both times.
TEST_F(S3Test, ADaemonRestartedOverAWarmDiskCacheFetchesNoFrameFromTheBucket) {
  std::mutex mu;
  std::map<std::string, int> blob_gets;
  FaultProxy proxy(port_, [&](const std::string& method, const std::string& path) {
    if (method == "GET" && path.find("/blobs/sha256/") != std::string::npos) {
      std::lock_guard lock(mu);
      ++blob_gets[path];
    }
    return FaultProxy::Decision{};
  });
  ASSERT_NE(proxy.port(), 0);
  const std::string cache_dir = dir_.path() + "/frame-cache";
  // What each daemon's metrics said once its VM had read every byte, and
  // how many GETs the restore itself sent (the image was opened before).
  struct Scraped {
    metrics::StoreCounts store;
    uint64_t restore_gets = 0;
    std::string text;
  };
  auto restore_once = [&](bool first) {
    // The same seed each time: the same memory file the image was made from.
    ServerHarness h(
        bucket_image("s3://" + bucket_name("fl-warm") + "/images", first, 4096, proxy.endpoint(), [&](ServerConfig& c) {
          c.cache_dir = cache_dir;
          c.cache_bytes = 64 * kMiB;
        }));
    const uint64_t gets_before = h.server().metrics().snapshot().store->gets;
    restore_every_byte(h);
    EXPECT_NE(h.log().find("disk_cache_open"), std::string::npos);
    Scraped out;
    out.store = *h.server().metrics().snapshot().store;
    out.restore_gets = out.store.gets - gets_before;
    out.text = h.server().metrics().render();
    return out;
  };
  const Scraped cold = restore_once(true);
  size_t frames = 0;
  {
    std::lock_guard lock(mu);
    frames = blob_gets.size();
    ASSERT_GT(frames, 0u);
    for (const auto& [path, n] : blob_gets) EXPECT_EQ(n, 1) << path;
    blob_gets.clear();
  }
  size_t cached = 0;
  uint64_t cached_bytes = 0;
  for (const auto& e : std::filesystem::directory_iterator(cache_dir)) {
    cached += e.is_regular_file();
    cached_bytes += e.file_size();
  }
  EXPECT_EQ(cached, frames);
  // The metrics tell the same story: every frame a GET and a disk-cache miss,
  // then kept (the daemon's frame cache holds the whole image: one load each).
  ASSERT_TRUE(cold.store.disk_cache);
  EXPECT_EQ(cold.restore_gets, frames);
  EXPECT_EQ(cold.store.disk_cache->misses, frames);
  EXPECT_EQ(cold.store.disk_cache->hits, 0u);
  EXPECT_EQ(cold.store.disk_cache->blobs, frames);
  EXPECT_EQ(cold.store.disk_cache->bytes, cached_bytes);
  EXPECT_EQ(cold.store.disk_cache->capacity_bytes, 64 * kMiB);
  EXPECT_EQ(cold.store.disk_cache->put_failures, 0u);
  EXPECT_NE(cold.text.find("faultline_disk_cache_misses_total " + std::to_string(frames) + "\n"), std::string::npos)
      << cold.text;
  EXPECT_NE(cold.text.find("faultline_disk_cache_frames " + std::to_string(frames) + "\n"), std::string::npos);
  EXPECT_NE(cold.text.find("faultline_object_store_gets_total "), std::string::npos);
  EXPECT_NE(cold.text.find("faultline_object_store_get_bytes_total "), std::string::npos);
  const Scraped warm = restore_once(false);
  std::lock_guard lock(mu);
  EXPECT_TRUE(blob_gets.empty()) << blob_gets.size() << " frames fetched again after the restart";
  ASSERT_TRUE(warm.store.disk_cache);
  EXPECT_EQ(warm.restore_gets, 0u);
  EXPECT_EQ(warm.store.disk_cache->hits, frames);
  EXPECT_EQ(warm.store.disk_cache->misses, 0u);
  EXPECT_EQ(warm.store.disk_cache->damaged, 0u);
  EXPECT_NE(warm.text.find("faultline_disk_cache_hits_total " + std::to_string(frames) + "\n"), std::string::npos)
      << warm.text;
}

// Two daemons (two hosts of a fleet) serve one image from one bucket at the
// same time, each with its own disk cache, one of them far smaller than the
// image (frames evicted and fetched again while VMs run): every byte right.
TEST_F(S3Test, TwoDaemonsShareABucketAndASmallDiskCacheEvictsWithoutAWrongByte) {
  ServerHarness first(
      bucket_image("s3://" + bucket_name("fl-shared") + "/images", true, 4096, {}, [&](ServerConfig& c) {
        c.cache_dir = dir_.path() + "/cache-a";
        c.cache_bytes = 64 * kMiB;
      }));
  ServerHarness second(
      bucket_image("s3://" + bucket_name("fl-shared") + "/images", false, 4096, {}, [&](ServerConfig& c) {
        c.cache_dir = dir_.path() + "/cache-b";
        c.cache_bytes = 1 * kMiB;  // 2 frames of 512 KiB at most
        c.frame_cache_bytes = 1 * kMiB;
      }));
  auto a = std::async(std::launch::async, [&] { restore_every_byte(first); });
  restore_every_byte(second);
  a.get();
  uint64_t cached_b = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir_.path() + "/cache-b")) cached_b += e.file_size();
  EXPECT_LE(cached_b, 1 * kMiB);
  EXPECT_GT(cached_b, 0u);
}

// Past --store-deadline a fault waiting for the store ends its session: the
// daemon (a separate process, as an operator runs it) kills the VM under
// --on-fatal=kill and says why; the daemon itself keeps running.
// One daemon, two sockets: the start-up one serves the bucket's image, a
// second one attached at run time serves a local image of other bytes; both
// VMs at once, every byte checked against its own model; then the bucket
// image attached once more on a third socket reads no frame twice (one
// frame cache for the daemon).
TEST_F(S3Test, OneDaemonServesABucketImageAndALocalImageOnSocketsAttachedAtRunTime) {
  ServerHarness h(bucket_image("s3://" + bucket_name("fl-attach") + "/images", true, 4096, {}, [&](ServerConfig& c) {
    std::filesystem::create_directory(dir_.path() + "/vms");
    c.socket_dir = dir_.path() + "/vms";
    c.cache_dir = dir_.path() + "/cache";
  }));
  const std::string other = dir_.path() + "/other.mem";
  ASSERT_TRUE(client::write_test_memory_file(other, 8 * kMiB, 99, 0.3));
  {
    auto local = image::LocalStore::open(dir_.path() + "/local", true);
    ASSERT_TRUE(local) << local.error().describe();
    image::CreateOptions o;
    o.memory_path = other;
    o.name = "other";
    ASSERT_TRUE(image::create_image(**local, o));
  }
  auto a = h.server().attach({.socket = "local.sock", .image = dir_.path() + "/local/other"});
  ASSERT_TRUE(a) << a.error().describe();
  client::RestoreOptions o;
  o.socket_path = dir_.path() + "/vms/local.sock";
  o.memory_path = other;
  o.touch_fraction = 1.0;
  auto on_local = std::async(std::launch::async, [&] { return client::run_restore(o); });
  restore_every_byte(h);
  auto r = on_local.get();
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u);
  EXPECT_GT(r->pages_verified, 0u);
  const uint64_t misses = h.server().metrics().snapshot().frame_cache->misses;

  auto again =
      h.server().attach({.socket = "again.sock", .image = "s3://" + bucket_name("fl-attach") + "/images/base"});
  ASSERT_TRUE(again) << again.error().describe();
  o.socket_path = dir_.path() + "/vms/again.sock";
  o.memory_path = h.memory();
  r = client::run_restore(o);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u);
  EXPECT_EQ(h.server().metrics().snapshot().frame_cache->misses, misses) << "frames read twice";
}

// --store-deadline 0: a session does not retry a failed read, but each
// store request still makes its attempts (a passed deadline would send
// none, and every fault, start-up and attach would fail unsent). Every
// first GET of a frame or manifest is answered 503 SlowDown.
TEST_F(S3Test, AStoreDeadlineOfZeroStillGivesEachRequestItsAttempts) {
  std::mutex mu;
  std::map<std::string, int> gets;
  FaultProxy proxy(port_, [&](const std::string& method, const std::string& path) {
    FaultProxy::Decision d;
    std::lock_guard lock(mu);
    if (method == "GET" && gets[path]++ == 0) d.action = FaultProxy::Action::kSlowDown;
    return d;
  });
  ASSERT_NE(proxy.port(), 0);
  const std::string url = "s3://" + bucket_name("fl-deadline-zero") + "/images";
  ServerHarness h(bucket_image(url, true, 4096, proxy.endpoint(), [&](ServerConfig& c) {
    std::filesystem::create_directories(dir_.path() + "/vms");
    c.socket_dir = dir_.path() + "/vms";
    c.store_deadline = std::chrono::milliseconds(0);
  }));
  restore_every_byte(h);
  {
    std::lock_guard lock(mu);
    gets.clear();  // the attach's manifest GETs are answered 503 first too
  }
  auto a = h.server().attach({.socket = "zero.sock", .image = url + "/base"});
  ASSERT_TRUE(a) << a.error().describe();
  std::lock_guard lock(mu);
  size_t blobs = 0;
  for (const auto& [path, n] : gets) EXPECT_EQ(n, 2) << path << ": answered 503, then sent again";
  for (const auto& [path, n] : gets) blobs += path.find("/blobs/") != std::string::npos;
  EXPECT_EQ(blobs, 0u) << "an attach reads manifests only";
  EXPECT_FALSE(gets.empty());
}

// An attach of a bucket image whose store takes the manifest's GET and
// never answers holds a control thread: it gives up at the daemon's store
// deadline (not after every timeout and retry of the S3 client: minutes),
// and at once when the daemon stops.
TEST_F(S3Test, AnAttachWhoseStoreNeverAnswersEndsAtTheStoreDeadlineAndWhenTheDaemonStops) {
  std::atomic<bool> hang{false};
  std::atomic<int> hung{0};
  FaultProxy proxy(port_, [&](const std::string& method, const std::string& path) {
    FaultProxy::Decision d;
    if (hang.load() && method == "GET" && path.find("/blobs/") == std::string::npos) {
      hung.fetch_add(1);
      d.action = FaultProxy::Action::kHang;  // the manifests
    }
    return d;
  });
  ASSERT_NE(proxy.port(), 0);
  const std::string url = "s3://" + bucket_name("fl-attach-hung") + "/images";
  for (const bool by_stop : {false, true}) {
    SCOPED_TRACE(by_stop ? "the daemon stops" : "the store deadline");
    hang.store(false);
    ServerHarness h(bucket_image(url, !by_stop, 4096, proxy.endpoint(), [&](ServerConfig& c) {
      std::filesystem::create_directories(dir_.path() + "/vms");
      c.socket_dir = dir_.path() + "/vms";
      c.store_deadline = by_stop ? std::chrono::seconds(120) : std::chrono::milliseconds(1500);
    }));
    hang.store(true);
    const int before = hung.load();
    auto attach = std::async(std::launch::async, [&] {
      return h.server().attach({.socket = by_stop ? "stop.sock" : "late.sock", .image = url + "/base"});
    });
    struct StopOnExit {
      Server& server;
      ~StopOnExit() { server.stop(); }  // a failed ASSERT does not wait for the store deadline
    } stop_on_exit{h.server()};
    ASSERT_TRUE(wait_until([&] { return hung.load() > before; }));  // the manifest's GET hangs
    if (by_stop) {
      // Other attaches and detaches go on meanwhile (the slow one holds no lock).
      auto other = std::async(std::launch::async, [&] {
        auto a = h.server().attach({.socket = "other.sock", .memory = h.memory()});
        if (!a) return a.error().describe();
        auto d = h.server().detach("other.sock");
        return d ? std::string("ok") : d.error().describe();
      });
      const bool other_done = other.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
      h.server().stop();  // before a failed ASSERT: it ends both attaches
      ASSERT_TRUE(other_done) << "held up by the slow attach";
      EXPECT_EQ(other.get(), "ok");
    }
    // Bounded, not timed: without the deadline this took minutes.
    // (The S3 client alone gives up after 5 attempts of 10 s without a byte.)
    ASSERT_EQ(attach.wait_for(std::chrono::seconds(30)), std::future_status::ready) << "the attach still waits";
    auto a = attach.get();
    ASSERT_FALSE(a);
    EXPECT_TRUE(a.error().retryable) << a.error().describe();
    EXPECT_NE(a.error().message.find(by_stop ? "the caller is stopping" : "deadline"), std::string::npos)
        << a.error().message;
    EXPECT_NE(a.error().message.find(url + "/base"), std::string::npos) << a.error().message;
    EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/vms/" + (by_stop ? "stop.sock" : "late.sock")));
  }
}

// A snapshot into a bucket that takes the new blobs' PUTs and never
// answers holds one control thread, not the control socket: other requests
// are answered meanwhile. It is cancelled when the daemon stops (instead of
// holding the daemon's exit for every timeout and retry), and writes no
// image.
TEST_F(S3Test, ASnapshotIntoAStoreThatNeverAnswersHoldsOneControlThreadAndEndsWhenTheDaemonStops) {
  std::atomic<bool> hang{false};
  std::atomic<int> hung{0};
  FaultProxy proxy(port_, [&](const std::string& method, const std::string& path) {
    FaultProxy::Decision d;
    if (hang.load() && method == "PUT" && path.find("/blobs/") != std::string::npos) {
      hung.fetch_add(1);
      d.action = FaultProxy::Action::kHang;
    }
    return d;
  });
  ASSERT_NE(proxy.port(), 0);
  const std::string url = "s3://" + bucket_name("fl-snap-hung") + "/fleet";
  ServerHarness h(
      bucket_image(url, true, 4096, proxy.endpoint(), [&](ServerConfig& c) { c.control_path = dir_.file("ctl"); }));
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {8 * kMiB}});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  std::memset(c->guest_ptr(5 * 4096), 0x5a, 4096);  // one page written: the diff has a blob to PUT
  const auto sessions = h.server().live_sessions();
  ASSERT_EQ(sessions.size(), 1u);
  const std::string id = std::to_string(sessions[0].id);
  hang.store(true);
  auto snap = std::async(std::launch::async, [&] {
    return control(dir_.file("ctl"),
                   R"({"cmd":"snapshot","session":)" + id + R"(,"store":")" + url + R"(","name":"gen1"})");
  });
  ASSERT_TRUE(wait_until([&] { return hung.load() > 0; }));  // its PUT hangs
  // Another control request is answered while the snapshot waits.
  const std::string listed = control(dir_.file("ctl"), R"({"cmd":"sessions"})");
  EXPECT_NE(listed.find(R"({"session":)" + id + ","), std::string::npos) << listed;
  // The same name again meanwhile is refused at once: a bucket has no
  // create-if-absent PUT, so its manifest would replace the first one's.
  const std::string twice =
      control(dir_.file("ctl"), R"({"cmd":"snapshot","session":)" + id + R"(,"store":")" + url + R"(","name":"gen1"})");
  EXPECT_NE(twice.find("is being written"), std::string::npos) << twice;
  EXPECT_EQ(snap.wait_for(std::chrono::milliseconds(0)), std::future_status::timeout) << "the snapshot did not wait";
  h.server().stop();
  // Bounded, not timed: without the cancellation this took 5 attempts of 10 s.
  ASSERT_EQ(snap.wait_for(std::chrono::seconds(30)), std::future_status::ready) << "the snapshot still waits";
  const std::string reply = snap.get();
  EXPECT_NE(reply.find("the caller is stopping"), std::string::npos) << reply;
  hang.store(false);
  auto bucket = s3_store(url, false);
  ASSERT_TRUE(bucket);
  auto manifest = bucket->manifest_exists("gen1");
  ASSERT_TRUE(manifest) << manifest.error().describe();
  EXPECT_FALSE(*manifest) << "an interrupted snapshot left an image";
  c->close_socket();
}

// Pause-and-snapshot in a fleet: a VM restored straight from the bucket
// writes and balloons some pages; `snapshot` (the control command and the
// CLI) writes its diff into the same bucket, on top of the served image; a
// second daemon restores the new image from the bucket alone and the VM sees
// every byte the first one had. Another bucket is refused.
TEST_F(S3Test, ASnapshotOfAVmServedFromTheBucketIsWrittenThereAndRestoresEveryByte) {
  const std::string url = "s3://" + bucket_name("fl-snap") + "/fleet";
  std::string model;
  {
    ServerHarness h(bucket_image(url, true, 4096, {}, [&](ServerConfig& c) {
      c.cache_dir = dir_.path() + "/cache";
      c.control_path = dir_.file("ctl");
    }));
    model = read_file(h.memory());
    auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {8 * kMiB}});
    ASSERT_TRUE(c) << c.error().describe();
    ASSERT_TRUE(c->connect_and_send(h.socket()));
    const uint64_t pages = 8 * kMiB / 4096;
    // Reads (served from the bucket), then writes, then the balloon.
    for (uint64_t p = 0; p < pages; p += 3) {
      ASSERT_EQ(std::memcmp(c->guest_ptr(p * 4096), model.data() + p * 4096, 4096), 0) << "page " << p;
    }
    std::set<uint64_t> written;
    for (uint64_t p = 1; p < pages; p += 37) {
      std::string bytes(4096, '\0');
      client::fill_write_pattern(900 + p, p * 4096, {reinterpret_cast<uint8_t*>(bytes.data()), bytes.size()});
      std::memcpy(c->guest_ptr(p * 4096), bytes.data(), 4096);
      model.replace(p * 4096, 4096, bytes);
      written.insert(p);
    }
    // A page written back to its old bytes is not stored again.
    std::memcpy(c->guest_ptr(2 * 4096), model.data() + 2 * 4096, 4096);
    for (uint64_t p : {uint64_t{38}, uint64_t{100}, uint64_t{101}}) {  // 38 was written, then ballooned
      auto r = c->remove(p * 4096, 4096);
      ASSERT_TRUE(r) << r.error().describe();
      model.replace(p * 4096, 4096, std::string(4096, '\0'));
      written.erase(p);
    }
    // The VM is paused from here on: this thread touches nothing.
    const auto sessions = h.server().live_sessions();
    ASSERT_EQ(sessions.size(), 1u);
    const uint64_t id = sessions[0].id;
    auto refused = h.server().snapshot(id, "s3://" + bucket_name("fl-other") + "/fleet", "gen1");
    ASSERT_FALSE(refused);
    EXPECT_EQ(refused.error().code, EPERM) << refused.error().describe();
    auto snap = h.server().snapshot(id, url + "/", "gen1");
    ASSERT_TRUE(snap) << snap.error().describe();
    EXPECT_EQ(snap->report.image.stored_pages, written.size());
    EXPECT_EQ(snap->parent, "base");
    // Images are immutable: the same name again is refused, in the bucket too.
    const std::string out = dir_.file("snapshot.out");
    const int status = wait_child(spawn({built_binary("faultline"), "snapshot", "--control", dir_.file("ctl"), "--session",
                                         std::to_string(id), "--store", url, "--name", "gen1"},
                                        out),
                                  std::chrono::seconds(60));
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << read_file(out);
    EXPECT_NE(read_file(out).find("exists"), std::string::npos) << read_file(out);
    c->close_socket();
    ASSERT_TRUE(h.wait_ended(1));
  }
  auto bucket = s3_store(url, false);
  ASSERT_TRUE(bucket);
  auto manifest = (*bucket).manifest_exists("gen1");
  ASSERT_TRUE(manifest && *manifest) << "gen1 is not in the bucket";
  // A daemon with nothing of it on disk restores the new image from the bucket.
  ServerHarness h2(bucket_image(url, false, 4096, {}, [&](ServerConfig& c) { c.image_path = url + "/gen1"; }));
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {8 * kMiB}});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h2.socket()));
  for (uint64_t p = 0; p < 8 * kMiB / 4096; ++p) {
    ASSERT_EQ(std::memcmp(c->guest_ptr(p * 4096), model.data() + p * 4096, 4096), 0) << "page " << p;
  }
  c->close_socket();
  ASSERT_TRUE(h2.wait_ended(1));
}

TEST_F(S3Test, PastTheStoreDeadlineTheSessionIsFatalAndTheVmIsKilled) {
  ASSERT_NO_FATAL_FAILURE(use_own_cluster());  // it stops the gateway for good
  const std::string mem = dir_.path() + "/mem";
  ASSERT_TRUE(client::write_test_memory_file(mem, 8 * kMiB, 11, 0.2));
  {
    auto local = image::LocalStore::open(dir_.path() + "/store", true);
    ASSERT_TRUE(local);
    image::CreateOptions c;
    c.memory_path = mem;
    c.name = "vm";
    ASSERT_TRUE(image::create_image(**local, c));
    auto bucket = s3_store("s3://" + bucket_name("fl-deadline") + "/images", true);
    ASSERT_TRUE(bucket);
    ASSERT_TRUE(image::copy_image(**local, *bucket, "vm", {}));
  }
  const std::string sock = dir_.path() + "/vm.sock", log = dir_.path() + "/serve.log";
  const pid_t daemon =
      spawn({built_binary("faultline"), "serve", "--socket", sock, "--image",
             "s3://" + bucket_name("fl-deadline") + "/images/vm", "--store-deadline", "1", "--on-fatal", "kill"},
            log);
  ASSERT_GT(daemon, 0);
  ASSERT_TRUE(eventually_true([&] { return read_file(log).find("event=server_start") != std::string::npos; }))
      << read_file(log);
  const std::string rgw = std::string("bash ") + FAULTLINE_SOURCE_DIR + "/scripts/rgw.sh ";
  ASSERT_EQ(std::system((rgw + "gateway-stop " + rgw_dir_).c_str()), 0);
  const std::string out = dir_.path() + "/client.out";
  const pid_t vm = spawn({built_binary("faultline-client"), "restore", "--socket", sock, "--memory", mem,
                          "--threads", "2"},
                         out);
  const int status = wait_child(vm, std::chrono::seconds(120));
  ASSERT_TRUE(WIFSIGNALED(status)) << "the VM was not killed: " << read_file(out);
  EXPECT_EQ(WTERMSIG(status), SIGKILL);
  const bool daemon_alive = ::kill(daemon, 0) == 0;
  ::kill(daemon, SIGTERM);
  const int daemon_status = wait_child(daemon, std::chrono::seconds(30));
  EXPECT_TRUE(daemon_alive) << "the daemon died with the session";
  EXPECT_TRUE(WIFEXITED(daemon_status) && WEXITSTATUS(daemon_status) == 0) << read_file(log);
  const std::string served = read_file(log);
  EXPECT_NE(served.find("state=fatal"), std::string::npos) << served;
  EXPECT_NE(served.find("retried for 1000 ms"), std::string::npos) << served;
  EXPECT_NE(served.find("s3://" + bucket_name("fl-deadline") + "/images/blobs/sha256/"), std::string::npos) << served;
  EXPECT_NE(served.find("peer_killed=true"), std::string::npos) << served;
}

// A store that takes every frame GET and never answers (a gateway hung or
// stopped with SIGSTOP, a black-holed connection) ends the session at its
// --store-deadline, and --on-fatal applies. The fault used to wait for every
// timeout and retry of the S3 client (5 attempts of up to 60 s) before the
// session's deadline was even looked at.
TEST_F(S3Test, AStoreThatNeverAnswersEndsTheSessionAtItsDeadline) {
  std::atomic<int> hung{0};
  FaultProxy proxy(port_, [&](const std::string& method, const std::string& path) {
    FaultProxy::Decision d;
    if (method == "GET" && path.find("/blobs/sha256/") != std::string::npos) {
      hung.fetch_add(1);
      d.action = FaultProxy::Action::kHang;
    }
    return d;
  });
  ASSERT_NE(proxy.port(), 0);
  ServerHarness h(
      bucket_image("s3://" + bucket_name("fl-hung") + "/images", true, 4096, proxy.endpoint(), [](ServerConfig& c) {
        c.store_deadline = std::chrono::milliseconds(1500);
        c.on_fatal = OnFatal::kKill;
      }));
  const std::string out = dir_.path() + "/client.out";
  const pid_t vm = spawn(
      {built_binary("faultline-client"), "restore", "--socket", h.socket(), "--memory", h.memory(), "--threads", "2"},
      out);
  ASSERT_GT(vm, 0);
  // Bounded: without the deadline in the S3 client this took minutes.
  const int status = wait_child(vm, std::chrono::seconds(60));
  ASSERT_TRUE(WIFSIGNALED(status)) << "the VM was not killed: " << read_file(out);
  EXPECT_EQ(WTERMSIG(status), SIGKILL);
  ASSERT_TRUE(h.wait_ended(1));
  const SessionSummary s = h.server().finished_sessions().at(0);
  EXPECT_EQ(s.end, SessionEnd::kFatal) << s.error;
  EXPECT_NE(s.error.find("retried for 1500 ms"), std::string::npos) << s.error;
  EXPECT_NE(s.error.find("/blobs/sha256/"), std::string::npos) << s.error;
  EXPECT_GT(hung.load(), 0);
}

// Two VMs restore from one bucket image and fault on the same frame: the
// first one's GET hangs, the second waits for that load (one load, shared).
// The first VM dies; its session stops and cancels its GET. That
// cancellation is the stopping session's, not the store's: the second VM's
// fault must load the frame itself and its VM must get every byte. (The
// cancelled GET was a final error, handed to the waiting session, which
// ended fatal.)
TEST_F(S3Test, ASessionThatStopsMidGetDoesNotFailAnotherSessionWaitingForThatFrame) {
  std::atomic<int> blob_gets{0};
  FaultProxy proxy(port_, [&](const std::string& method, const std::string& path) {
    FaultProxy::Decision d;
    if (method == "GET" && path.find("/blobs/sha256/") != std::string::npos && blob_gets.fetch_add(1) == 0) {
      d.action = FaultProxy::Action::kHang;  // the first frame GET only
    }
    return d;
  });
  ASSERT_NE(proxy.port(), 0);
  ServerHarness h(bucket_image("s3://" + bucket_name("fl-shared-load") + "/images", true, 4096, proxy.endpoint(),
                               [](ServerConfig& c) {
                                 c.store_deadline = std::chrono::seconds(60);
                                 c.on_fatal = OnFatal::kKill;
                               }));
  const std::string out = dir_.path() + "/first.out";
  const pid_t first = spawn(
      {built_binary("faultline-client"), "restore", "--socket", h.socket(), "--memory", h.memory(), "--threads", "1"},
      out);
  ASSERT_GT(first, 0);
  ASSERT_TRUE(wait_until([&] { return blob_gets.load() >= 1; })) << read_file(out);  // its GET hangs
  const auto load_waits = [&] {
    const std::string m = h.server().metrics().render();
    const std::string name = "faultline_frame_cache_load_waits_total ";
    const size_t at = m.find("\n" + name);
    return at == std::string::npos ? uint64_t{0} : std::stoull(m.substr(at + 1 + name.size()));
  };
  // Sequential on one thread, as the first VM: its first frame is the hung
  // one. A fatal session kills its VM (rather than leave it hanging).
  const std::string second_out = dir_.path() + "/second.out";
  const pid_t second = spawn(
      {built_binary("faultline-client"), "restore", "--socket", h.socket(), "--memory", h.memory(), "--threads", "1"},
      second_out);
  ASSERT_GT(second, 0);
  ASSERT_TRUE(wait_until([&] { return load_waits() >= 1; })) << "the second VM never waited for the first's load";
  EXPECT_EQ(blob_gets.load(), 1) << "the second VM fetched the hung frame itself";
  ::kill(first, SIGKILL);
  (void)wait_child(first, std::chrono::seconds(30));
  const int status = wait_child(second, std::chrono::seconds(120));
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "exit status " << status << " (exits 0 only with every byte right): " << read_file(second_out);
  ASSERT_TRUE(h.wait_ended(2));
  for (const SessionSummary& s : h.server().finished_sessions()) {
    EXPECT_NE(s.end, SessionEnd::kFatal) << "session " << s.id << ": " << s.error;
  }
}

// --- working-set prefetch from the bucket, with frames read ahead ----------

// A working set of every 4 KiB page of a guest of `bytes`, in a shuffled
// order: the installs need the image's frames scattered, not in storage order.
std::string write_shuffled_working_set(const std::string& path, uint64_t bytes) {
  WorkingSet ws;
  ws.page_size = 4096;
  ws.memory_file_size = bytes;
  for (uint64_t off = 0; off < bytes; off += 4096) ws.offsets.push_back(off);
  std::shuffle(ws.offsets.begin(), ws.offsets.end(), std::mt19937_64(42));
  EXPECT_TRUE(write_working_set(path, ws));
  return path;
}

// The value of `key` in the first `event` line of a text log (0 if absent).
uint64_t log_count(const std::string& log, const std::string& event, const std::string& key) {
  const size_t line = log.find("event=" + event + " ");
  if (line == std::string::npos) return 0;
  const size_t end = log.find('\n', line);
  const size_t at = log.find(" " + key + "=", line);
  if (at == std::string::npos || at > end) return 0;
  return std::stoull(log.substr(at + key.size() + 2));
}

// Blob GETs that reach the gateway through a FaultProxy: counted per object
// and, while the gate is closed, held until `open_at` of them are held at
// once (then the gate opens for good) or until release(). A gate that never
// opens fails the test after 30 s instead of hanging it.
struct BlobGetGate {
  explicit BlobGetGate(int open_at) : open_at(open_at) {}
  FaultProxy::Decision on_request(const std::string& method, const std::string& path) {
    if (method != "GET" || path.find("/blobs/sha256/") == std::string::npos) return {};
    std::unique_lock lock(mu);
    ++gets[path];
    ++total;
    if (open) return {};
    ++held;
    max_held = std::max(max_held, held);
    if (open_at > 0 && held >= open_at) {
      open = true;
      cv.notify_all();
    } else {
      cv.notify_all();  // for wait_held()
      if (!cv.wait_for(lock, std::chrono::seconds(30), [&] { return open; })) {
        timed_out = true;
        open = true;
        cv.notify_all();
      }
    }
    --held;
    return {};
  }
  // Blocks until `n` GETs are held at once (false after 30 s).
  bool wait_held(int n) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(30), [&] { return held >= n || open; }) && !open;
  }
  void release() {
    std::lock_guard lock(mu);
    open = true;
    cv.notify_all();
  }

  const int open_at;  // 0: only release() opens
  std::mutex mu;
  std::condition_variable cv;
  bool open = false, timed_out = false;
  int held = 0, max_held = 0, total = 0;
  std::map<std::string, int> gets;
};

// A VM that restores and touches nothing until the prefetch is done, then
// reads every page of its 8 MiB: each byte checked against the memory file.
void check_every_byte_after_prefetch(ServerHarness& h) {
  auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {8 * kMiB}});
  ASSERT_TRUE(c) << c.error().describe();
  ASSERT_TRUE(c->connect_and_send(h.socket()));
  ASSERT_TRUE(wait_until([&] { return h.log().find("event=prefetch_done") != std::string::npos; })) << h.log();
  auto v = client::Verifier::open(h.memory(), c->guest_size(), c->page_size());
  ASSERT_TRUE(v) << v.error().describe();
  std::vector<uint64_t> offsets;
  for (uint64_t off = 0; off < c->guest_size(); off += c->page_size()) offsets.push_back(off);
  auto r = client::touch_pages(*c, **v, offsets, client::Access::kRead);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_EQ(r->mismatches, 0u);
}

// `serve --prefetch FILE` from the bucket: the frames are loaded ahead of the
// installs, each frame is fetched once (a load ahead and an install that
// wants the same frame share one GET), every frame read ahead is still in the
// cache when its install comes, and every byte is right.
TEST_F(S3Test, PrefetchFromTheBucketReadsFramesAheadFetchesEachOnceAndEveryByteIsRight) {
  BlobGetGate counter(0);
  counter.open = true;  // count only
  FaultProxy proxy(port_, [&](const std::string& m, const std::string& p) { return counter.on_request(m, p); });
  ASSERT_NE(proxy.port(), 0);
  const std::string ws = write_shuffled_working_set(dir_.path() + "/ws", 8 * kMiB);
  ServerHarness h(bucket_image("s3://" + bucket_name("fl-prefetch") + "/images", true, 4096, proxy.endpoint(),
                               [&](ServerConfig& c) { c.prefetch_path = ws; }));
  check_every_byte_after_prefetch(h);
  ASSERT_TRUE(h.wait_ended(1));
  EXPECT_EQ(h.server().finished_sessions().at(0).end, SessionEnd::kSocketClosed);
  const std::string log = h.log();
  const uint64_t ahead = log_count(log, "prefetch_done", "read_ahead_frames");
  EXPECT_GT(ahead, 0u) << log;
  EXPECT_EQ(log_count(log, "prefetch_done", "read_ahead_used"), ahead);
  EXPECT_EQ(log_count(log, "prefetch_done", "read_ahead_evicted_unused"), 0u);
  EXPECT_EQ(log_count(log, "prefetch_done", "read_ahead_failed"), 0u);
  EXPECT_EQ(log_count(log, "prefetch_done", "prefetched_pages"), 8 * kMiB / 4096) << "every planned page";
  const auto snap = h.server().metrics().snapshot();
  ASSERT_TRUE(snap.frame_cache.has_value());
  EXPECT_EQ(snap.frame_cache->loads_ahead, ahead);
  std::lock_guard lock(counter.mu);
  ASSERT_FALSE(counter.gets.empty());
  EXPECT_LE(ahead, counter.gets.size());
  for (const auto& [path, n] : counter.gets) EXPECT_EQ(n, 1) << path << " fetched more than once";
}

// The blob GETs are held at the proxy until 8 of them wait at once: with two
// prefetch threads and no guest faulting, only read-ahead can have that many
// in flight (without it this gate never opens and the test fails).
TEST_F(S3Test, PrefetchKeepsManyFrameGetsInFlightAtOnceAheadOfItsInstalls) {
  constexpr int kAtOnce = 8;
  BlobGetGate gate(kAtOnce);
  FaultProxy proxy(port_, [&](const std::string& m, const std::string& p) { return gate.on_request(m, p); });
  ASSERT_NE(proxy.port(), 0);
  const std::string ws = write_shuffled_working_set(dir_.path() + "/ws", 8 * kMiB);
  ServerHarness h(bucket_image("s3://" + bucket_name("fl-inflight") + "/images", true, 4096, proxy.endpoint(),
                               [&](ServerConfig& c) {
                                 c.prefetch_path = ws;
                                 c.prefetch_threads = 2;
                                 c.prefetch_fetches = 12;
                               }));
  check_every_byte_after_prefetch(h);
  ASSERT_TRUE(h.wait_ended(1));
  std::lock_guard lock(gate.mu);
  EXPECT_FALSE(gate.timed_out) << "never " << kAtOnce << " frame GETs in flight at once (at most " << gate.max_held
                               << ")";
  EXPECT_GE(gate.max_held, kAtOnce);
  EXPECT_GE(log_count(h.log(), "prefetch_done", "read_ahead_frames"), static_cast<uint64_t>(kAtOnce - 2));
}

// A frame cache of two frames (1 MiB of 512 KiB frames): read-ahead stays
// one frame ahead, frames come and go, and the prefetch is still right to the
// byte with no error.
TEST_F(S3Test, PrefetchWithAFrameCacheOfTwoFramesIsRightToTheByte) {
  const std::string ws = write_shuffled_working_set(dir_.path() + "/ws", 8 * kMiB);
  ServerHarness h(
      bucket_image("s3://" + bucket_name("fl-small-cache") + "/images", true, 4096, {}, [&](ServerConfig& c) {
        c.prefetch_path = ws;
        c.frame_cache_bytes = 1 * kMiB;
      }));
  check_every_byte_after_prefetch(h);
  ASSERT_TRUE(h.wait_ended(1));
  const SessionSummary s = h.server().finished_sessions().at(0);
  EXPECT_EQ(s.end, SessionEnd::kSocketClosed) << s.error;
  const std::string log = h.log();
  EXPECT_EQ(log_count(log, "prefetch_done", "read_ahead_failed"), 0u);
  EXPECT_EQ(log_count(log, "prefetch_done", "prefetched_pages"), 8 * kMiB / 4096) << log;
  EXPECT_EQ(log_count(log, "prefetch_done", "read_ahead_used") +
                log_count(log, "prefetch_done", "read_ahead_evicted_unused"),
            log_count(log, "prefetch_done", "read_ahead_frames"));
  EXPECT_EQ(log.find("session_fatal"), std::string::npos) << log;
}

// The VM goes away while the read-ahead's GETs are held at the proxy: once
// they are let through, the session ends cleanly and no further frame is
// fetched (at most one GET per fetch thread and prefetch thread in all).
TEST_F(S3Test, AVmGoneWhileReadAheadGetsAreHeldEndsTheSessionWithoutFetchingMore) {
  constexpr int kFetches = 4;
  BlobGetGate gate(0);
  FaultProxy proxy(port_, [&](const std::string& m, const std::string& p) { return gate.on_request(m, p); });
  ASSERT_NE(proxy.port(), 0);
  const std::string ws = write_shuffled_working_set(dir_.path() + "/ws", 8 * kMiB);
  ServerHarness h(
      bucket_image("s3://" + bucket_name("fl-stop") + "/images", true, 4096, proxy.endpoint(), [&](ServerConfig& c) {
        c.prefetch_path = ws;
        c.prefetch_threads = 1;
        c.prefetch_fetches = kFetches;
      }));
  {
    auto c = client::FirecrackerClient::create({.version = {1, 14}, .region_sizes = {8 * kMiB}});
    ASSERT_TRUE(c) << c.error().describe();
    ASSERT_TRUE(c->connect_and_send(h.socket()));
    ASSERT_TRUE(gate.wait_held(kFetches)) << "the read-ahead's GETs did not arrive";
  }  // the VM exits: its socket closes
  ASSERT_TRUE(wait_until([&] {
    auto live = h.server().live_sessions();
    return !live.empty() && live[0].end != SessionEnd::kRunning;
  })) << "the session did not see the VM go";
  gate.release();
  ASSERT_TRUE(h.wait_ended(1));
  const SessionSummary s = h.server().finished_sessions().at(0);
  EXPECT_EQ(s.end, SessionEnd::kSocketClosed) << s.error;
  EXPECT_NE(h.log().find("event=prefetch_done"), std::string::npos);
  std::lock_guard lock(gate.mu);
  EXPECT_FALSE(gate.timed_out);
  EXPECT_LE(gate.total, kFetches + 1) << "frames were fetched after the session stopped";
}

}  // namespace
}  // namespace faultline::testing
