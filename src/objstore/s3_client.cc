#include "objstore/s3_client.h"

#include <curl/curl.h>
#include <openssl/evp.h>
#include <strings.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <system_error>
#include <thread>

#include "common/deadline.h"
#include "common/text_escape.h"

namespace faultline::objstore {

namespace {

// curl_global_init is not thread-safe: run it once, before any handle.
void init_curl_once() {
  static const bool done = [] { return curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK; }();
  (void)done;
}

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

std::string trim(std::string s) {
  const auto first = s.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) return {};
  const auto last = s.find_last_not_of(" \t\r\n");
  return s.substr(first, last - first + 1);
}

// Keys of one profile of an AWS shared credentials file ("[name]", "k = v").
void read_profile(const std::string& path, const std::string& profile, std::string& access, std::string& secret) {
  std::ifstream in(path);
  std::string line, section;
  while (std::getline(in, line)) {
    line = trim(line);
    if (line.empty() || line[0] == '#' || line[0] == ';') continue;
    if (line.front() == '[' && line.back() == ']') {
      section = trim(line.substr(1, line.size() - 2));
      continue;
    }
    if (section != profile) continue;
    const auto eq = line.find('=');
    if (eq == std::string::npos) continue;
    const std::string k = trim(line.substr(0, eq)), v = trim(line.substr(eq + 1));
    if (k == "aws_access_key_id" && access.empty()) access = v;
    if (k == "aws_secret_access_key" && secret.empty()) secret = v;
  }
}

// Percent-encodes a key for the URL path, keeping '/' (S3's unreserved set).
std::string encode_key(const std::string& key) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : key) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' || c == '/') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

// A query parameter's value, percent-encoded with uppercase hex as SigV4's
// canonical query string has it.
std::string query_escape(std::string_view v) {
  char* e = curl_easy_escape(nullptr, v.data(), static_cast<int>(v.size()));
  std::string out = e ? e : "";
  curl_free(e);
  return out;
}

std::string xml_escape(std::string_view s) {
  std::string out;
  for (char ch : s) {
    switch (ch) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      default:
        out += ch;
    }
  }
  return out;
}

std::string xml_unescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '&') {
      out += s[i];
      continue;
    }
    static const std::pair<std::string_view, char> entities[] = {
        {"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&apos;", '\''}};
    bool matched = false;
    for (const auto& [name, ch] : entities) {
      if (s.substr(i, name.size()) == name) {
        out += ch;
        i += name.size() - 1;
        matched = true;
        break;
      }
    }
    if (!matched) out += '&';
  }
  return out;
}

// Every <tag>value</tag> in an S3 XML answer (flat: S3's answers never nest
// a tag inside one of the same name).
std::vector<std::string> xml_values(std::string_view xml, std::string_view tag) {
  std::vector<std::string> out;
  const std::string open = "<" + std::string(tag) + ">", close = "</" + std::string(tag) + ">";
  size_t at = 0;
  while ((at = xml.find(open, at)) != std::string_view::npos) {
    at += open.size();
    const size_t end = xml.find(close, at);
    if (end == std::string_view::npos) break;
    out.push_back(xml_unescape(xml.substr(at, end - at)));
    at = end + close.size();
  }
  return out;
}

std::string xml_value(std::string_view xml, std::string_view tag) {
  auto v = xml_values(xml, tag);
  return v.empty() ? std::string() : v[0];
}

// Where write_body() puts a body, and how much of one it takes (0: any).
struct BodySink {
  std::string* body;
  uint64_t limit = 0;
  bool over = false;
};

size_t write_body(char* data, size_t size, size_t n, void* user) {
  auto* sink = static_cast<BodySink*>(user);
  if (sink->limit != 0 && sink->body->size() + size * n > sink->limit) {
    sink->over = true;
    return 0;  // curl stops the transfer: CURLE_WRITE_ERROR
  }
  sink->body->append(data, size * n);
  return size * n;
}

// Stops a transfer once the calling thread's ScopedDeadline is cancelled
// (its session stopping); curl calls it at least once a second.
int check_cancelled(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  return static_cast<const ThreadDeadline*>(user)->cancelled() ? 1 : 0;
}

// What read_header() fills in.
struct HeaderSink {
  std::string* etag;
  std::string* body;
};

// Bodies up to this size are reserved from their Content-Length, so that a
// frame is received into one allocation instead of a string that grows (and
// copies what it holds) as the bytes arrive. Larger ones grow: a bogus
// length must not make us allocate it.
constexpr uint64_t kMaxReservedBody = 64ull << 20;

// Keeps the ETag header of the answer (of its last status line: a
// "100 Continue" comes first for large bodies) and reserves room for the
// body it announces.
size_t read_header(char* data, size_t size, size_t n, void* user) {
  const std::string_view line(data, size * n);
  auto* sink = static_cast<HeaderSink*>(user);
  if (line.size() > 5 && ::strncasecmp(line.data(), "etag:", 5) == 0) {
    *sink->etag = trim(std::string(line.substr(5)));
  } else if (line.size() > 15 && ::strncasecmp(line.data(), "content-length:", 15) == 0) {
    const std::string value = trim(std::string(line.substr(15)));
    uint64_t length = 0;
    const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), length);
    if (ec == std::errc() && end == value.data() + value.size() && length <= kMaxReservedBody) {
      sink->body->reserve(static_cast<size_t>(length));
    }
  }
  return size * n;
}

struct Upload {
  std::string_view body;
  size_t at = 0;
};
size_t read_body(char* out, size_t size, size_t n, void* user) {
  auto* up = static_cast<Upload*>(user);
  const size_t len = std::min(size * n, up->body.size() - up->at);
  std::memcpy(out, up->body.data() + up->at, len);
  up->at += len;
  return len;
}

}  // namespace

Result<S3Config> S3Config::from_environment() {
  S3Config c;
  c.endpoint = env("AWS_ENDPOINT_URL");
  while (!c.endpoint.empty() && c.endpoint.back() == '/') c.endpoint.pop_back();
  if (c.endpoint.empty()) {
    return fail("no S3 endpoint: set AWS_ENDPOINT_URL (for example http://127.0.0.1:7480)");
  }
  if (std::string r = env("AWS_REGION"); !r.empty()) {
    c.region = r;
  } else if (std::string d = env("AWS_DEFAULT_REGION"); !d.empty()) {
    c.region = d;
  }
  c.access_key = env("AWS_ACCESS_KEY_ID");
  c.secret_key = env("AWS_SECRET_ACCESS_KEY");
  if (c.access_key.empty() || c.secret_key.empty()) {
    std::string file = env("AWS_SHARED_CREDENTIALS_FILE");
    if (file.empty() && !env("HOME").empty()) file = env("HOME") + "/.aws/credentials";
    std::string profile = env("AWS_PROFILE");
    if (profile.empty()) profile = "default";
    if (!file.empty()) read_profile(file, profile, c.access_key, c.secret_key);
    if (c.access_key.empty() || c.secret_key.empty()) {
      return fail("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give profile '" + profile +
                  "' aws_access_key_id and aws_secret_access_key in " + (file.empty() ? "~/.aws/credentials" : file));
    }
  }
  return c;
}

namespace {
std::atomic<uint64_t> g_requests{0}, g_gets{0}, g_get_body_bytes{0}, g_retries{0};

// S3 refuses a part under 5 MiB unless it is the last, and more than 10000
// parts in one upload.
constexpr uint64_t kMinPartSize = 5 * 1024 * 1024;
constexpr uint64_t kMaxParts = 10000;
// How long aborting a failed multipart upload may take, past its caller's
// deadline or stop.
constexpr auto kAbortDeadline = std::chrono::seconds(10);
}  // namespace

struct S3Client::Handle {
  CURL* curl = nullptr;
  ~Handle() {
    if (curl) curl_easy_cleanup(curl);
  }
};

Result<std::unique_ptr<S3Client>> S3Client::create(S3Config config) {
  init_curl_once();
  if (config.endpoint.rfind("http://", 0) != 0 && config.endpoint.rfind("https://", 0) != 0) {
    return fail("S3 endpoint '" + escape_untrusted(config.endpoint) + "' is not an http:// or https:// URL");
  }
  if (config.max_connections == 0) config.max_connections = 1;
  if (config.max_attempts < 1) config.max_attempts = 1;
  if (config.multipart_part_size < kMinPartSize) {
    return fail("S3 multipart part size " + std::to_string(config.multipart_part_size) +
                " is below S3's minimum of 5 MiB");
  }
  if (config.multipart_parallel_parts == 0) config.multipart_parallel_parts = 1;
  return std::unique_ptr<S3Client>(new S3Client(std::move(config)));
}

S3Client::S3Client(S3Config config) : config_(std::move(config)) {}
S3Client::~S3Client() = default;

uint64_t S3Client::requests() const {
  std::lock_guard lock(mu_);
  return requests_;
}

std::unique_ptr<S3Client::Handle> S3Client::acquire(const std::optional<ThreadDeadline>& deadline) {
  std::unique_lock lock(mu_);
  const auto ready = [&] { return !free_.empty() || open_ < config_.max_connections; };
  if (deadline) {
    if (!wait_unless_given_up(free_cv_, lock, *deadline, ready)) return nullptr;
  } else {
    free_cv_.wait(lock, ready);
  }
  if (!free_.empty()) {
    auto h = std::move(free_.back());
    free_.pop_back();
    return h;
  }
  ++open_;
  lock.unlock();
  auto h = std::make_unique<Handle>();
  h->curl = curl_easy_init();
  return h;
}

void S3Client::release(std::unique_ptr<Handle> h) {
  std::lock_guard lock(mu_);
  if (h && h->curl) {
    free_.push_back(std::move(h));
  } else {
    --open_;
  }
  free_cv_.notify_one();
}

std::string S3Client::url(const std::string& bucket, const std::string& key, const std::string& query) const {
  std::string u = config_.endpoint + "/" + encode_key(bucket);
  if (!key.empty()) u += "/" + encode_key(key);
  if (!query.empty()) u += "?" + query;
  return u;
}

constexpr long kReceiveBufferBytes = 512 * 1024;  // curl's maximum before 7.88

Result<S3Client::Response> S3Client::perform_once(Handle& h, const std::string& method, const std::string& url,
                                                  const std::string& what, std::string_view body,
                                                  std::optional<ByteRange> range, std::chrono::milliseconds timeout,
                                                  uint64_t max_body) {
  CURL* c = h.curl;
  if (!c) return fail("curl_easy_init failed", ENOMEM);
  curl_easy_reset(c);  // keeps the connection; forgets the last request's options
  Response r;
  Upload up{body, 0};
  const std::string sigv4 = "aws:amz:" + config_.region + ":s3";
  curl_easy_setopt(c, CURLOPT_URL, url.c_str());
  curl_easy_setopt(c, CURLOPT_AWS_SIGV4, sigv4.c_str());
  curl_easy_setopt(c, CURLOPT_USERNAME, config_.access_key.c_str());
  curl_easy_setopt(c, CURLOPT_PASSWORD, config_.secret_key.c_str());
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_TCP_NODELAY, 1L);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(config_.connect_timeout.count()));
  curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, static_cast<long>(std::max<int64_t>(1, timeout.count())));
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME,
                   static_cast<long>(std::max<int64_t>(1, (config_.stall_timeout.count() + 999) / 1000)));
  const std::optional<ThreadDeadline> deadline = current_deadline();
  if (deadline && deadline->has_flags()) {
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, check_cancelled);  // reads `deadline`, which outlives the transfer
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, const_cast<ThreadDeadline*>(&*deadline));
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
  }
  // A frame (hundreds of KiB to 2 MiB) arrives in reads of this size rather
  // than curl's default 16 KiB: fewer recv() calls and callbacks per GET.
  curl_easy_setopt(c, CURLOPT_BUFFERSIZE, kReceiveBufferBytes);
  BodySink body_sink{&r.body, max_body};
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, write_body);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &body_sink);
  HeaderSink sink{&r.etag, &r.body};
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, read_header);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, &sink);
  // libcurl signs but does not send the payload hash header, which S3 (and
  // RGW) require: without it every request is refused with 403
  // SignatureDoesNotMatch. The payload is not signed; its content is
  // checked against its address by the store's readers.
  curl_slist* headers = curl_slist_append(nullptr, "x-amz-content-sha256: UNSIGNED-PAYLOAD");
  std::string range_header;
  if (method == "GET") {
    if (range) {
      // "FIRST-LAST": curl sends it as "Range: bytes=FIRST-LAST".
      range_header = std::to_string(range->offset) + "-" + std::to_string(range->offset + range->length - 1);
      curl_easy_setopt(c, CURLOPT_RANGE, range_header.c_str());
    }
  } else if (method == "PUT") {
    curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(c, CURLOPT_READFUNCTION, read_body);
    curl_easy_setopt(c, CURLOPT_READDATA, &up);
    curl_easy_setopt(c, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(body.size()));
    // Not "Expect:" to skip the 100-continue round trip of large bodies:
    // libcurl 7.88 signs the emptied header as if it were sent, and the
    // store answers 403 SignatureDoesNotMatch.
  } else if (method == "POST") {
    // An empty body (CreateMultipartUpload) as "": with a null pointer
    // libcurl would read the body from its read callback.
    curl_easy_setopt(c, CURLOPT_POST, 1L);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body.empty() ? "" : body.data());
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body.size()));
  } else if (method == "HEAD") {
    curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
  } else {
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method.c_str());
  }
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);
  {
    std::lock_guard lock(mu_);
    ++requests_;
  }
  const CURLcode rc = curl_easy_perform(c);
  curl_slist_free_all(headers);
  if (rc != CURLE_OK) {
    if (body_sink.over) {
      return fail(method + " " + what + ": the store sent more than the " + std::to_string(max_body) +
                      " bytes expected (an object of the wrong size)",
                  EFBIG);
    }
    Error e{0, method + " " + what + " (" + config_.endpoint + ") failed: " + curl_easy_strerror(rc)};
    // Connection and timeout failures may pass; a malformed URL or a
    // certificate that does not verify will not. A stop asked for (the
    // caller's ScopedDeadline cancelled) says nothing of the store: it is
    // retryable, since the error reaches every thread that waited for this
    // load (FrameCache), and those did not stop. perform() tries no further
    // attempt for the caller that stopped.
    e.retryable = rc != CURLE_URL_MALFORMAT && rc != CURLE_UNSUPPORTED_PROTOCOL && rc != CURLE_NOT_BUILT_IN &&
                  rc != CURLE_PEER_FAILED_VERIFICATION && rc != CURLE_SSL_CERTPROBLEM &&
                  rc != CURLE_SSL_CACERT_BADFILE && rc != CURLE_SSL_CIPHER;
    e.code = rc == CURLE_OPERATION_TIMEDOUT    ? ETIMEDOUT
             : rc == CURLE_COULDNT_CONNECT     ? ECONNREFUSED
             : rc == CURLE_ABORTED_BY_CALLBACK ? ECANCELED
                                               : EIO;
    return std::unexpected(e);
  }
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r.status);
  curl_off_t length = 0;
  curl_easy_getinfo(c, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length);
  r.content_length = length > 0 ? static_cast<uint64_t>(length) : 0;
  return r;
}

Result<S3Client::Response> S3Client::perform(const std::string& method, const std::string& bucket,
                                             const std::string& key, const std::string& query, std::string_view body,
                                             std::optional<ByteRange> range, uint64_t max_body) {
  using std::chrono::milliseconds;
  const std::string u = url(bucket, key, query);
  const std::string what = "s3://" + bucket + (key.empty() ? "" : "/" + key);
  thread_local std::minstd_rand jitter(std::random_device{}());
  const std::optional<ThreadDeadline> deadline = current_deadline();
  const auto left = [&] {
    return std::chrono::duration_cast<milliseconds>(deadline->at - std::chrono::steady_clock::now());
  };
  auto backoff = config_.first_backoff;
  Error last;
  int attempts = 0;
  bool waited_for_connection = false;
  for (int attempt = 1; attempt <= config_.max_attempts; ++attempt) {
    if (attempt > 1) {
      // Full jitter: a fleet retrying together does not hit the store in step.
      std::uniform_int_distribution<int64_t> d(0, backoff.count());
      const milliseconds pause(d(jitter));
      if (deadline && (deadline->passed() || pause >= left())) break;  // no attempt would finish in time
      if (!deadline) {
        std::this_thread::sleep_for(pause);
      } else if (!sleep_unless_given_up(pause, *deadline)) {
        break;  // stopped while it waited
      }
      backoff *= 2;
    }
    if (deadline && deadline->passed()) break;
    auto h = acquire(deadline);
    if (!h || (deadline && deadline->passed())) {
      // The deadline passed (or the scope was cancelled) first, or while the
      // connection was handed over: an attempt now would be cut short at once.
      if (h) release(std::move(h));
      waited_for_connection = true;
      break;
    }
    milliseconds timeout = config_.request_timeout;
    if (deadline) timeout = std::min(timeout, std::max(left(), milliseconds(1)));
    ++attempts;
    auto r = perform_once(*h, method, u, what, body, range, timeout, max_body);
    release(std::move(h));
    g_requests.fetch_add(1, std::memory_order_relaxed);
    if (attempt > 1) g_retries.fetch_add(1, std::memory_order_relaxed);
    if (method == "GET") {
      g_gets.fetch_add(1, std::memory_order_relaxed);
      if (r) g_get_body_bytes.fetch_add(r->body.size(), std::memory_order_relaxed);
    }
    if (!r) {
      last = r.error();
      if (!last.retryable) return std::unexpected(last);
      continue;
    }
    const long status = r->status;
    if (status >= 200 && status < 300) return r;
    const std::string code = xml_value(r->body, "Code");
    // 5xx (503 SlowDown among them) and 429: the store is busy or failing
    // for a moment; 408 and S3's 400 RequestTimeout: the request was too
    // slow to arrive (a congested link). Everything else is an answer that
    // would repeat itself.
    if (status >= 500 || status == 429 || status == 408 || code == "RequestTimeout") {
      last = Error{EAGAIN, method + " " + what + ": the store answered " + std::to_string(status) +
                               (code.empty() ? "" : " " + code),
                   true};
      continue;
    }
    if (status == 404 || code == "NoSuchKey" || code == "NoSuchBucket" || code == "NoSuchUpload") {
      if (code == "NoSuchUpload") return fail(method + " " + what + ": no such multipart upload", ENOENT);
      if (code == "NoSuchBucket") return fail("bucket '" + escape_untrusted(bucket) + "' does not exist (" + what + ")", ENOENT);
      return std::unexpected(Error{ENOENT, what + ": no such object"});
    }
    if (status == 403 || status == 401) {
      return fail(method + " " + what + ": the store refused the credentials (" +
                      (code.empty() ? std::to_string(status) : code) +
                      "); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                  EACCES);
    }
    return fail(method + " " + what + ": the store answered " + std::to_string(status) +
                    (code.empty() ? "" : " " + code) + (xml_value(r->body, "Message").empty() ? "" : ": " + escape_untrusted(xml_value(r->body, "Message"))),
                EIO);
  }
  const bool cancelled = deadline && deadline->cancelled();
  if (attempts == 0) {
    const std::string waited = waited_for_connection ? " after waiting for one of the " +
                                                           std::to_string(config_.max_connections) + " connections"
                                                     : std::string();
    return std::unexpected(Error{cancelled ? ECANCELED : ETIMEDOUT,
                                 method + " " + what + ": not sent" + waited +
                                     (cancelled ? ": the caller is stopping" : ": the caller's deadline had passed"),
                                 true});
  }
  // A stop says more than the last attempt's failure: callers tell a
  // cancellation by its code (it stays retryable, see perform_once()).
  if (cancelled) last.code = ECANCELED;
  const char* why = cancelled ? ", stopped: the caller is stopping)" : ", stopped at the caller's deadline)";
  last.message += " (after " + std::to_string(attempts) + (attempts == 1 ? " attempt" : " attempts") +
                  (attempts < config_.max_attempts || cancelled ? why : ")");
  return std::unexpected(last);
}

Result<std::string> S3Client::get(const std::string& bucket, const std::string& key, std::optional<ByteRange> range,
                                  uint64_t max_bytes) {
  auto r = perform("GET", bucket, key, "", {}, range, max_bytes);
  if (!r) return std::unexpected(r.error());
  if (range && r->body.size() != range->length) {
    // A 200 (the whole object) or a short 206: not the bytes asked for.
    return fail("GET s3://" + bucket + "/" + key + " bytes " + std::to_string(range->offset) + "+" +
                    std::to_string(range->length) + ": the store returned " + std::to_string(r->body.size()) +
                    " bytes",
                EIO);
  }
  return std::move(r->body);
}

Status S3Client::put(const std::string& bucket, const std::string& key, std::string_view body) {
  // An empty body has no part to send, whatever the threshold.
  if (!body.empty() && body.size() >= config_.multipart_threshold) return put_multipart(bucket, key, body);
  auto r = perform("PUT", bucket, key, "", body, std::nullopt);
  if (!r) return std::unexpected(r.error());
  return {};
}

// Query strings below are written in SigV4's canonical form (parameters
// sorted by name, a valueless one as "uploads="): libcurl 7.88 signs the
// query exactly as given, while the store signs its canonical form.
namespace {

// The ETag S3 gives the object a multipart upload of parts with these
// ETags makes: the MD5 of the parts' MD5s (each part's ETag, quoted hex),
// then "-" and the part count, quoted. Empty when a part's ETag is not a
// plain MD5 (a store that encrypts with KMS, for one): then nothing can be
// concluded from the object's ETag.
std::string multipart_etag(const std::vector<std::string>& part_etags) {
  std::string md5s;
  for (const std::string& etag : part_etags) {
    const std::string_view hex = std::string_view(etag).substr(etag.starts_with('"') ? 1 : 0, 32);
    if (hex.size() != 32 || (etag.starts_with('"') ? etag.size() != 34 || etag.back() != '"' : etag.size() != 32)) {
      return {};
    }
    for (size_t i = 0; i < 32; i += 2) {
      unsigned byte = 0;
      const auto [end, ec] = std::from_chars(hex.data() + i, hex.data() + i + 2, byte, 16);
      if (ec != std::errc() || end != hex.data() + i + 2) return {};
      md5s.push_back(static_cast<char>(byte));
    }
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned len = 0;
  if (EVP_Digest(md5s.data(), md5s.size(), digest, &len, EVP_md5(), nullptr) != 1 || len != 16) return {};
  return "\"" + hex_lower({digest, len}) + "-" + std::to_string(part_etags.size()) + "\"";
}

}  // namespace

Status S3Client::put_multipart(const std::string& bucket, const std::string& key, std::string_view body) {
  const std::string what = "multipart upload of s3://" + bucket + "/" + key;
  const uint64_t part_size = std::max(config_.multipart_part_size, (body.size() + kMaxParts - 1) / kMaxParts);
  const size_t parts = static_cast<size_t>((body.size() + part_size - 1) / part_size);

  auto created = perform("POST", bucket, key, "uploads=", {}, std::nullopt);
  if (!created) {
    Error e = created.error();
    e.message = what + ": starting it: " + e.message;
    return std::unexpected(e);
  }
  const std::string upload_id = xml_value(created->body, "UploadId");
  if (upload_id.empty()) return fail(what + ": the store answered CreateMultipartUpload without an UploadId", EIO);
  const std::string upload_query = "uploadId=" + query_escape(upload_id);

  // Every failure after this point aborts the upload: the parts already
  // stored would otherwise stay in the bucket (invisible, but kept and
  // billed) until someone aborts it.
  auto abort_upload = [&](Error cause) {
    // Cleanup, so not under the caller's deadline (a part that failed at it
    // would leave the upload's parts in the bucket), but bounded by one of
    // its own, which a stopping caller does not cancel.
    const ScopedDeadline cleanup(ThreadDeadline{.at = std::chrono::steady_clock::now() + kAbortDeadline});
    auto aborted = perform("DELETE", bucket, key, upload_query, {}, std::nullopt);
    // NoSuchUpload: nothing is left to abort.
    if (!aborted && aborted.error().code != ENOENT) {
      cause.message += "; aborting the upload (id " + escape_untrusted(upload_id) +
                       ") failed as well, its parts stay in the bucket until it is aborted: " + aborted.error().message;
    }
    cause.message = what + ": " + cause.message;
    return std::unexpected(cause);
  };

  // A few parts at once, each a request of its own on the connection pool
  // (retried there); the first failure stops the others from starting more.
  std::vector<std::string> etags(parts);
  std::atomic<size_t> next_part{0};
  std::atomic<bool> failed{false};
  std::mutex error_mu;
  std::optional<Error> first_error;
  auto upload_parts = [&] {
    while (!failed.load()) {
      const size_t i = next_part.fetch_add(1);
      if (i >= parts) return;
      const std::string number = std::to_string(i + 1);
      auto r = perform("PUT", bucket, key, "partNumber=" + number + "&" + upload_query,
                       body.substr(i * part_size, part_size), std::nullopt);
      std::optional<Error> e;
      if (!r) {
        e = r.error();
        e->message = "part " + number + " of " + std::to_string(parts) + ": " + e->message;
      } else if (r->etag.empty()) {
        e = Error{EIO, "part " + number + ": the store answered UploadPart without an ETag"};
      }
      if (e) {
        std::lock_guard lock(error_mu);
        if (!first_error) first_error = std::move(e);
        failed = true;
        return;
      }
      etags[i] = std::move(r->etag);
    }
  };
  {
    // The helpers' requests end with the caller's: at its deadline, or when
    // it stops (the join below would otherwise wait for every timeout and
    // retry of theirs). Declared before `helpers`: it outlives their join.
    const std::optional<ThreadDeadline> caller = current_deadline();
    std::vector<std::jthread> helpers;
    const size_t width = std::min({parts, config_.multipart_parallel_parts, config_.max_connections});
    for (size_t t = 1; t < width; ++t) {
      try {
        helpers.emplace_back([&] {
          const ScopedDeadline inherited(caller);
          upload_parts();
        });
      } catch (const std::system_error&) {
        break;  // no thread to spare: the parts go up on fewer
      }
    }
    upload_parts();
  }  // joins the helpers: no part is in flight when the upload is aborted
  // (S3 may keep a part that finishes after the abort, and the upload with it)
  if (first_error) return abort_upload(*first_error);

  std::string complete = "<CompleteMultipartUpload>";
  for (size_t i = 0; i < parts; ++i) {
    complete +=
        "<Part><PartNumber>" + std::to_string(i + 1) + "</PartNumber><ETag>" + xml_escape(etags[i]) + "</ETag></Part>";
  }
  complete += "</CompleteMultipartUpload>";
  auto completed = perform("POST", bucket, key, upload_query, complete, std::nullopt);
  if (!completed && completed.error().code == ENOENT) {
    // NoSuchUpload: the upload is gone. An attempt of this completion may
    // have succeeded with its answer lost (perform() then sent it again, and
    // AWS answers a repeat NoSuchUpload where RGW answers the result once
    // more): the object is then there, with the ETag of exactly these
    // parts. Anything else (the upload aborted by someone else) is an error.
    const std::string expected = multipart_etag(etags);
    auto object = perform("HEAD", bucket, key, "", {}, std::nullopt);
    if (object && !expected.empty() && object->etag == expected && object->content_length == body.size()) return {};
    Error e = completed.error();
    if (object) {
      e.message += "; the object there is not the one these parts make (ETag " + escape_untrusted(object->etag) + ", " +
                   std::to_string(object->content_length) + " bytes; expected " +
                   (expected.empty() ? std::string("an ETag the parts' ETags do not give") : expected) + ", " +
                   std::to_string(body.size()) + " bytes)";
    } else if (object.error().code == ENOENT) {
      e.message += "; and no object is there";
    } else {
      // Whether the upload completed is unknown: the object may well be
      // there. Retryable when the HEAD was.
      e = object.error();
      e.message =
          "CompleteMultipartUpload answered NoSuchUpload, and whether the object is there could not be "
          "checked: " +
          e.message;
    }
    return abort_upload(std::move(e));
  }
  if (!completed) return abort_upload(completed.error());
  // S3 may answer 200 and then fail while assembling the parts: the error
  // is then in the body ("a 200 OK response can contain either a success
  // or an error", CompleteMultipartUpload in the S3 API reference).
  if (completed->body.find("<CompleteMultipartUploadResult") == std::string::npos) {
    const std::string code = xml_value(completed->body, "Code");
    return abort_upload(
        Error{EIO,
              "CompleteMultipartUpload: the store answered 200 " +
                  (code.empty() ? std::string("without a result") : "with error " + escape_untrusted(code)),
              code == "InternalError" || code == "SlowDown"});
  }
  return {};
}

Result<std::vector<std::string>> S3Client::unfinished_uploads(const std::string& bucket, const std::string& prefix) {
  std::vector<std::string> keys;
  std::string key_marker, upload_id_marker;
  for (;;) {
    std::string query;  // sorted by name, see put_multipart
    if (!key_marker.empty()) query += "key-marker=" + query_escape(key_marker) + "&";
    if (!prefix.empty()) query += "prefix=" + query_escape(prefix) + "&";
    if (!upload_id_marker.empty()) query += "upload-id-marker=" + query_escape(upload_id_marker) + "&";
    query += "uploads=";
    auto r = perform("GET", bucket, "", query, {}, std::nullopt);
    if (!r) return std::unexpected(r.error());
    // <Key> appears only inside each <Upload> (the markers have tags of their own).
    for (std::string& k : xml_values(r->body, "Key")) keys.push_back(std::move(k));
    if (xml_value(r->body, "IsTruncated") != "true") break;
    key_marker = xml_value(r->body, "NextKeyMarker");
    upload_id_marker = xml_value(r->body, "NextUploadIdMarker");
    if (key_marker.empty()) {
      return fail("LIST uploads s3://" + bucket + "/" + prefix + ": a truncated answer without a marker", EIO);
    }
  }
  return keys;
}

Result<std::optional<uint64_t>> S3Client::head(const std::string& bucket, const std::string& key) {
  auto r = perform("HEAD", bucket, key, "", {}, std::nullopt);
  if (!r) {
    // A HEAD answer has no body: a 404 may be a missing bucket as well.
    if (r.error().code == ENOENT) return std::optional<uint64_t>{};
    return std::unexpected(r.error());
  }
  return std::optional<uint64_t>{r->content_length};
}

Status S3Client::remove(const std::string& bucket, const std::string& key) {
  auto r = perform("DELETE", bucket, key, "", {}, std::nullopt);
  if (!r && r.error().code != ENOENT) return std::unexpected(r.error());
  return {};
}

Result<std::vector<std::string>> S3Client::list(const std::string& bucket, const std::string& prefix,
                                                size_t max_keys) {
  std::vector<std::string> keys;
  std::string token;
  for (;;) {
    // Query parameters in sorted order (SigV4's canonical query string).
    std::string query;
    if (!token.empty()) {
      char* t = curl_easy_escape(nullptr, token.c_str(), static_cast<int>(token.size()));
      query += "continuation-token=" + std::string(t) + "&";
      curl_free(t);
    }
    query += "list-type=2";
    if (max_keys > 0) query += "&max-keys=" + std::to_string(max_keys);
    if (!prefix.empty()) {
      char* p = curl_easy_escape(nullptr, prefix.c_str(), static_cast<int>(prefix.size()));
      query += "&prefix=" + std::string(p);
      curl_free(p);
    }
    auto r = perform("GET", bucket, "", query, {}, std::nullopt);
    if (!r) return std::unexpected(r.error());
    for (std::string& k : xml_values(r->body, "Key")) keys.push_back(std::move(k));
    if (max_keys > 0 && keys.size() >= max_keys) {
      keys.resize(max_keys);
      break;
    }
    if (xml_value(r->body, "IsTruncated") != "true") break;
    token = xml_value(r->body, "NextContinuationToken");
    if (token.empty()) return fail("LIST s3://" + bucket + "/" + prefix + ": a truncated answer without a token", EIO);
  }
  return keys;
}

Status S3Client::create_bucket(const std::string& bucket) {
  auto r = perform("PUT", bucket, "", "", {}, std::nullopt);
  if (!r) {
    if (r.error().message.find("BucketAlreadyOwnedByYou") != std::string::npos) return {};
    return std::unexpected(r.error());
  }
  return {};
}

bool is_s3_url(std::string_view location) { return location.rfind("s3://", 0) == 0; }

Result<S3Location> S3Location::parse(std::string_view url) {
  if (!is_s3_url(url)) return fail("'" + escape_untrusted(url) + "' is not an s3://BUCKET/PREFIX URL");
  std::string_view rest = url.substr(5);
  S3Location l;
  const size_t slash = rest.find('/');
  l.bucket = std::string(rest.substr(0, slash));
  if (slash != std::string_view::npos) l.prefix = std::string(rest.substr(slash + 1));
  while (!l.prefix.empty() && l.prefix.back() == '/') l.prefix.pop_back();
  if (l.bucket.size() < 3 || l.bucket.size() > 63) {
    return fail("'" + escape_untrusted(url) + "': a bucket name has 3 to 63 characters");
  }
  for (char ch : l.bucket) {
    if (!(std::islower(static_cast<unsigned char>(ch)) || std::isdigit(static_cast<unsigned char>(ch)) || ch == '-' ||
          ch == '.')) {
      return fail("'" + escape_untrusted(url) + "': a bucket name holds lowercase letters, digits, '-' and '.'");
    }
  }
  return l;
}

S3Client::Totals S3Client::process_totals() {
  return Totals{g_requests.load(std::memory_order_relaxed), g_gets.load(std::memory_order_relaxed),
                g_get_body_bytes.load(std::memory_order_relaxed), g_retries.load(std::memory_order_relaxed)};
}

}  // namespace faultline::objstore
