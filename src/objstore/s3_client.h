// S3Client: the S3 API calls faultline needs (GET with a range, PUT, HEAD,
// DELETE, ListObjectsV2, create bucket, multipart upload) over HTTP with
// libcurl, which signs
// every request with AWS Signature V4 (CURLOPT_AWS_SIGV4). Path-style
// addressing (`ENDPOINT/BUCKET/KEY`), any endpoint: AWS, Ceph's RADOS
// Gateway, MinIO.
//
// Connections: a bounded pool of curl handles, each keeping its connection
// alive between requests (a new connection costs ~13-17 ms against ~1 ms for
// a small ranged GET on a kept-alive one, measured on loopback here); a
// request waits for a free handle when all are busy.
//
// Errors: timeouts, connection failures and resets, 5xx answers, 503
// SlowDown, 429 and 408/400 RequestTimeout are retried with exponential
// backoff and full jitter, up to `max_attempts`; what is left is returned
// with Error::retryable set, so a caller with a deadline of its own (a
// session serving faults) can retry longer. A request that receives nothing
// for `stall_timeout` fails as a timeout (a store that accepts connections
// and never answers). A thread with a ScopedDeadline (common/deadline.h:
// a session serving a fault) gets no attempt, backoff or wait past it: the
// request fails then, retryable, and stops at once when the scope's flag is
// set (the session stopping). A certificate that does not verify is not
// retried. A missing object or bucket is ENOENT, refused credentials EACCES,
// each with a sentence naming what is missing or refused. Credentials never
// appear in an error or a log line.
//
// Large bodies: `put` sends a body of `multipart_threshold` bytes or more as
// a multipart upload (CreateMultipartUpload, UploadPart for each
// `multipart_part_size` slice, a few at once, CompleteMultipartUpload), each
// request retried as above; an upload that fails is aborted
// (AbortMultipartUpload), so its parts do not stay behind in the bucket.
//
// Thread-safety: safe for concurrent use from any number of threads.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/deadline.h"
#include "common/error.h"

namespace faultline::objstore {

struct S3Config {
  std::string endpoint;  // "http://127.0.0.1:7480", no trailing slash
  std::string region = "us-east-1";
  std::string access_key;
  std::string secret_key;
  size_t max_connections = 16;
  int max_attempts = 5;  // per request, the first included
  std::chrono::milliseconds connect_timeout{5000};
  std::chrono::milliseconds request_timeout{60000};
  // No byte received (nor sent) for this long: the attempt fails as a
  // timeout and is retried on a new connection. Whole seconds (libcurl's
  // low-speed check); at least 1.
  std::chrono::milliseconds stall_timeout{10000};
  std::chrono::milliseconds first_backoff{50};  // doubled per attempt, with jitter
  // Bodies of this size or more go up in parts of `multipart_part_size`
  // bytes (the last part smaller), `multipart_parallel_parts` at once.
  // S3 refuses parts under 5 MiB other than the last: create() refuses a
  // smaller part size.
  uint64_t multipart_threshold = 16 * 1024 * 1024;
  uint64_t multipart_part_size = 8 * 1024 * 1024;
  size_t multipart_parallel_parts = 4;

  // The way AWS tools take them: AWS_ENDPOINT_URL, AWS_REGION (or
  // AWS_DEFAULT_REGION), AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; keys
  // missing from the environment come from the shared credentials file
  // (AWS_SHARED_CREDENTIALS_FILE, else ~/.aws/credentials), profile
  // AWS_PROFILE or "default". An endpoint is required (no AWS default).
  static Result<S3Config> from_environment();
};

struct ByteRange {
  uint64_t offset = 0;
  uint64_t length = 0;  // > 0
};

class S3Client {
 public:
  static Result<std::unique_ptr<S3Client>> create(S3Config config);
  ~S3Client();
  S3Client(const S3Client&) = delete;
  S3Client& operator=(const S3Client&) = delete;

  // The object's bytes, or `range` of them (REQUIRES: within the object).
  // With `max_bytes` > 0 a body longer than that is not received: the GET
  // fails (EFBIG, not retried) as soon as the store has sent more, so an
  // object of the wrong size cannot take the memory its size would.
  Result<std::string> get(const std::string& bucket, const std::string& key,
                          std::optional<ByteRange> range = std::nullopt, uint64_t max_bytes = 0);
  // Stores the object whole (S3 makes it visible all at once, a multipart
  // upload too: only when it completes). On failure no object of that key
  // was created by this call and no part of it is left in the bucket
  // (unless the process dies mid-upload, or the abort itself fails: then
  // the error says so).
  Status put(const std::string& bucket, const std::string& key, std::string_view body);
  // The object's size, or nullopt when there is no such object.
  Result<std::optional<uint64_t>> head(const std::string& bucket, const std::string& key);
  // Succeeds when the object is gone (also when it never existed).
  Status remove(const std::string& bucket, const std::string& key);
  // Every key that starts with `prefix`, in S3's order (by key); with
  // `max_keys` > 0, at most that many (the first ones).
  Result<std::vector<std::string>> list(const std::string& bucket, const std::string& prefix, size_t max_keys = 0);
  // Succeeds when the bucket exists afterwards (also when it existed).
  Status create_bucket(const std::string& bucket);

  // What every S3Client of this process sent and received since it started
  // (each attempt counts; relaxed counters, read while requests run): for
  // the benchmark's GETs per restore and bytes fetched.
  struct Totals {
    uint64_t requests = 0;        // every attempt that reached the network
    uint64_t gets = 0;            // of those, GETs
    uint64_t get_body_bytes = 0;  // bytes of the bodies GETs received
    uint64_t retries = 0;         // attempts after the first of a request
  };
  static Totals process_totals();
  // The keys of the multipart uploads started under `prefix` and neither
  // completed nor aborted (ListMultipartUploads), in S3's order; a key
  // appears once per such upload. What a killed writer leaves behind.
  Result<std::vector<std::string>> unfinished_uploads(const std::string& bucket, const std::string& prefix);

  // Requests sent, retries included (tests and the benchmark count GETs).
  uint64_t requests() const;
  const S3Config& config() const { return config_; }

 private:
  struct Handle;
  struct Response {
    long status = 0;
    std::string body;
    uint64_t content_length = 0;
    std::string etag;  // the ETag header, quotes included, if any
  };
  explicit S3Client(S3Config config);
  Status put_multipart(const std::string& bucket, const std::string& key, std::string_view body);
  // One request with retries. `body` for PUT and POST; `range` for GET.
  // `max_body` > 0: a GET whose body grows past it fails (EFBIG).
  Result<Response> perform(const std::string& method, const std::string& bucket, const std::string& key,
                           const std::string& query, std::string_view body, std::optional<ByteRange> range,
                           uint64_t max_body = 0);
  // `what`: "s3://bucket/key", for error messages. `timeout`: this
  // attempt's, at most config_.request_timeout.
  Result<Response> perform_once(Handle& h, const std::string& method, const std::string& url, const std::string& what,
                                std::string_view body, std::optional<ByteRange> range,
                                std::chrono::milliseconds timeout, uint64_t max_body);
  // A free handle (a new one while fewer than max_connections are open);
  // waits for one, no longer than `deadline` (nullptr then).
  std::unique_ptr<Handle> acquire(const std::optional<ThreadDeadline>& deadline);
  void release(std::unique_ptr<Handle> h);
  std::string url(const std::string& bucket, const std::string& key, const std::string& query) const;

  S3Config config_;
  mutable std::mutex mu_;
  std::condition_variable free_cv_;
  std::vector<std::unique_ptr<Handle>> free_;
  size_t open_ = 0;
  uint64_t requests_ = 0;
};

// "s3://bucket/some/prefix" -> {"bucket", "some/prefix"} (no trailing slash).
struct S3Location {
  std::string bucket;
  std::string prefix;
  static Result<S3Location> parse(std::string_view url);
  std::string url() const { return "s3://" + bucket + (prefix.empty() ? "" : "/" + prefix); }
};
bool is_s3_url(std::string_view location);

}  // namespace faultline::objstore
