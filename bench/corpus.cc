#include "bench/corpus.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "common/unique_fd.h"
#include "snapshot/working_set.h"

namespace faultline::bench {
namespace {

constexpr uint64_t kPage = 4096;
// Resident pages are kept in chunks of this many (256 KiB) when a process
// has more than its budget, and the corpus is laid out in chunks of it.
constexpr uint64_t kChunkPages = 64;
// The compiler is stopped once its resident set is this many times its
// budget: far enough into the build to be in its optimisation passes' heap,
// not only the parser's (cc1plus on session.cc peaks near 300 MiB here).
constexpr double kCompilerStopFactor = 2.5;
constexpr auto kCompilerResume = std::chrono::milliseconds(500);
constexpr auto kCompilerPoll = std::chrono::milliseconds(20);
constexpr int kInterpreterRequests = 8;
// pagemap entry bit 63: the page is in RAM (Documentation/admin-guide/mm/pagemap.rst).
constexpr uint64_t kPagemapPresent = 1ull << 63;

// The interpreter's program: imports a broad slice of the standard library,
// builds an application heap, says "ready", then serves one request per line
// read (a search over the heap, a JSON round trip, a regex, an sqlite query).
constexpr const char* kInterpreterScript = R"PY(
import sys, importlib
mods = """abc argparse ast asyncio base64 bisect calendar collections concurrent.futures contextlib copy csv
dataclasses datetime decimal difflib email email.mime.text enum fractions functools gettext glob gzip hashlib heapq
hmac html html.parser http.client http.server inspect io ipaddress itertools json logging logging.handlers lzma math
mimetypes multiprocessing numbers operator os pathlib pickle pkgutil platform pprint queue random re shlex shutil
signal socket socketserver sqlite3 ssl statistics string struct subprocess tarfile tempfile textwrap threading time
tokenize traceback typing unittest unittest.mock urllib.parse urllib.request uuid warnings weakref xml.dom.minidom
xml.etree.ElementTree zipfile zlib""".split()
loaded = 0
for m in mods:
    try:
        importlib.import_module(m)
        loaded += 1
    except Exception:
        pass
import json, random, re, sqlite3, collections
rng = random.Random(7)
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10))) for _ in range(5000)]
records = [{"id": i, "name": rng.choice(words) + " " + rng.choice(words), "tags": rng.sample(words, 3),
            "score": rng.random(), "active": i % 3 == 0} for i in range(60000)]
index = collections.defaultdict(list)
for r in records:
    for t in r["tags"]:
        index[t].append(r["id"])
db = sqlite3.connect(":memory:")
db.execute("create table r (id integer primary key, name text, score real)")
db.executemany("insert into r values (?, ?, ?)", [(r["id"], r["name"], r["score"]) for r in records])
sys.stdout.write("ready %d\n" % loaded)
sys.stdout.flush()
for line in sys.stdin:
    req = rng.sample(words, 200)
    hits = [records[i] for w in req for i in index.get(w, [])][:20000]
    for h in hits[::7]:
        h["score"] = h["score"] * 0.5 + 0.25
    body = json.dumps({"query": req, "hits": hits})
    back = json.loads(body)
    pat = re.compile("|".join(req[:20]))
    n = sum(1 for r in back["hits"] if pat.search(r["name"]))
    top = db.execute("select name, score from r where score > ? order by score desc limit 2000", (rng.random(),)).fetchall()
    sys.stdout.write("done %d %d %d\n" % (len(hits), n, len(top)))
    sys.stdout.flush()
)PY";

// A child process in its own process group; the whole group (the g++
// driver and its cc1plus) is killed and the child reaped on destruction.
struct Child {
  pid_t pid = -1;
  UniqueFd to_child, from_child;  // pipes, when asked for
  Child() = default;
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child() {
    if (pid > 0) {
      ::kill(-pid, SIGKILL);
      int status = 0;
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
    }
  }
};

Result<std::unique_ptr<Child>> spawn(const std::vector<std::string>& argv, bool pipes) {
  int in[2] = {-1, -1}, out[2] = {-1, -1};
  if (pipes && (::pipe2(in, O_CLOEXEC) != 0 || ::pipe2(out, O_CLOEXEC) != 0)) return fail_errno("pipe2");
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  auto child = std::make_unique<Child>();
  const pid_t pid = ::fork();
  if (pid < 0) return fail_errno("fork");
  if (pid == 0) {
    ::setpgid(0, 0);
    const int devnull = ::open("/dev/null", O_RDWR);
    ::dup2(pipes ? in[0] : devnull, 0);
    ::dup2(pipes ? out[1] : devnull, 1);
    ::dup2(devnull, 2);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  ::setpgid(pid, pid);  // also from the parent: no race with the kill in ~Child
  child->pid = pid;
  if (pipes) {
    ::close(in[0]);
    ::close(out[1]);
    child->to_child = UniqueFd(in[1]);
    child->from_child = UniqueFd(out[0]);
  }
  return child;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

uint64_t resident_bytes_of(pid_t pid) {
  unsigned long long size = 0, resident = 0;
  std::istringstream in(read_text("/proc/" + std::to_string(pid) + "/statm"));
  in >> size >> resident;
  return resident * kPage;
}

// The state letter of /proc/PID/stat ('T' when stopped), or 0.
char state_of(pid_t pid) {
  const std::string stat = read_text("/proc/" + std::to_string(pid) + "/stat");
  const size_t paren = stat.rfind(')');
  return paren == std::string::npos || paren + 2 >= stat.size() ? 0 : stat[paren + 2];
}

// The first child of `parent` found in /proc (the g++ driver's cc1plus).
pid_t child_of(pid_t parent) {
  DIR* d = ::opendir("/proc");
  if (d == nullptr) return -1;
  pid_t found = -1;
  while (dirent* e = ::readdir(d)) {
    const pid_t pid = static_cast<pid_t>(std::atol(e->d_name));
    if (pid <= 0) continue;
    const std::string stat = read_text("/proc/" + std::to_string(pid) + "/stat");
    const size_t paren = stat.rfind(')');
    if (paren == std::string::npos) continue;
    std::istringstream rest(stat.substr(paren + 2));
    char state = 0;
    long ppid = 0;
    rest >> state >> ppid;
    if (ppid == parent) {
      found = pid;
      break;
    }
  }
  ::closedir(d);
  return found;
}

Status stop_and_wait(pid_t pid) {
  if (::kill(pid, SIGSTOP) != 0) return fail_errno("SIGSTOP " + std::to_string(pid));
  for (int i = 0; i < 5000 && state_of(pid) != 'T'; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (state_of(pid) != 'T') return fail("process " + std::to_string(pid) + " did not stop");
  return {};
}

// A process's resident pages, read out.
struct Dump {
  std::vector<uint64_t> vaddrs;  // ascending
  std::string bytes;             // vaddrs.size() pages
  uint64_t resident_pages = 0;
};

Result<Dump> dump_resident(pid_t pid, uint64_t budget_pages) {
  const std::string proc = "/proc/" + std::to_string(pid);
  std::istringstream maps(read_text(proc + "/maps"));
  UniqueFd pagemap(::open((proc + "/pagemap").c_str(), O_RDONLY | O_CLOEXEC));
  UniqueFd mem(::open((proc + "/mem").c_str(), O_RDONLY | O_CLOEXEC));
  if (!pagemap || !mem) return fail_errno("cannot open " + proc + "/pagemap or /mem");
  std::vector<uint64_t> resident;
  std::string line;
  std::vector<uint64_t> entries(4096);
  while (std::getline(maps, line)) {
    unsigned long long start = 0, end = 0;
    char perms[8] = {};
    if (std::sscanf(line.c_str(), "%llx-%llx %7s", &start, &end, perms) != 3 || perms[0] != 'r') continue;
    // The vDSO's data pages and vsyscall are the kernel's, not the program's.
    if (line.find("[vvar") != std::string::npos || line.find("[vsyscall]") != std::string::npos) continue;
    if (end - start > (64ull << 30)) continue;  // a reservation, not memory
    for (uint64_t va = start; va < end;) {
      const uint64_t n = std::min<uint64_t>(entries.size(), (end - va) / kPage);
      const ssize_t got = ::pread(pagemap.get(), entries.data(), n * 8, static_cast<off_t>(va / kPage * 8));
      if (got <= 0) break;
      for (uint64_t i = 0; i < static_cast<uint64_t>(got) / 8; ++i) {
        if (entries[i] & kPagemapPresent) resident.push_back(va + i * kPage);
      }
      va += static_cast<uint64_t>(got) / 8 * kPage;
    }
  }
  Dump dump;
  dump.resident_pages = resident.size();
  // Keep whole chunks, evenly spread: chunk c is kept when the running share
  // of the budget crosses an integer there (a Bresenham line).
  const uint64_t chunks = (resident.size() + kChunkPages - 1) / kChunkPages;
  const uint64_t keep = std::min(chunks, budget_pages / kChunkPages);
  std::vector<uint64_t> kept;
  for (uint64_t c = 0; c < chunks; ++c) {
    if ((c + 1) * keep / chunks == c * keep / chunks) continue;
    for (uint64_t i = c * kChunkPages; i < std::min<uint64_t>(resident.size(), (c + 1) * kChunkPages); ++i) {
      kept.push_back(resident[i]);
    }
  }
  std::string page(kPage, '\0');
  dump.bytes.reserve(kept.size() * kPage);
  for (uint64_t va : kept) {
    // A page that cannot be read (a mapping that went away) is dropped.
    if (::pread(mem.get(), page.data(), kPage, static_cast<off_t>(va)) != static_cast<ssize_t>(kPage)) continue;
    dump.vaddrs.push_back(va);
    dump.bytes += page;
  }
  if (dump.vaddrs.empty()) return fail("no page of process " + std::to_string(pid) + " could be read");
  return dump;
}

// Indexes into dump.vaddrs of pages whose bytes differ now from the dump
// and did not before (`seen`), in address order. The kernel here has no
// soft-dirty bits (CONFIG_MEM_SOFT_DIRTY is off), so the process's memory is
// read again and compared, as a diff snapshot compares: a page written back
// to its old bytes does not count.
std::vector<uint64_t> newly_changed(pid_t pid, const Dump& dump, std::vector<bool>& seen) {
  std::vector<uint64_t> out;
  UniqueFd mem(::open(("/proc/" + std::to_string(pid) + "/mem").c_str(), O_RDONLY | O_CLOEXEC));
  if (!mem) return out;
  std::string now;
  for (uint64_t i = 0; i < dump.vaddrs.size();) {
    uint64_t j = i + 1;
    while (j < dump.vaddrs.size() && dump.vaddrs[j] == dump.vaddrs[j - 1] + kPage) ++j;
    now.resize((j - i) * kPage);
    if (::pread(mem.get(), now.data(), now.size(), static_cast<off_t>(dump.vaddrs[i])) ==
        static_cast<ssize_t>(now.size())) {
      for (uint64_t k = i; k < j; ++k) {
        if (!seen[k] && std::memcmp(now.data() + (k - i) * kPage, dump.bytes.data() + k * kPage, kPage) != 0) {
          seen[k] = true;
          out.push_back(k);
        }
      }
    }
    i = j;
  }
  return out;
}

// One source of data pages in the corpus.
struct Part {
  CorpusPart info;
  std::string bytes;                            // its pages
  std::vector<std::vector<uint64_t>> touches;   // working set: per tick, page indexes
};

Result<Part> take_compiler(const CorpusOptions& o, uint64_t budget_pages) {
  const std::string source = o.source_dir + "/src/server/session.cc";
  if (::access(source.c_str(), R_OK) != 0) return fail_errno("the compiler's input " + source + " is not readable");
  auto child = spawn({"g++", "-std=c++23", "-O2", "-I" + o.source_dir + "/src", "-I" + o.source_dir, "-c", source,
                      "-o", "/dev/null"},
                     false);
  if (!child) return std::unexpected(child.error());
  const uint64_t stop_at = static_cast<uint64_t>(static_cast<double>(budget_pages * kPage) * kCompilerStopFactor);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(3);
  pid_t cc1 = -1;
  uint64_t rss = 0;
  while (true) {
    int status = 0;
    if (::waitpid((*child)->pid, &status, WNOHANG) == (*child)->pid) {
      (*child)->pid = -1;
      return fail("g++ finished (status " + std::to_string(status) + ") before its cc1plus reached " +
                  std::to_string(stop_at >> 20) + " MiB resident (last seen " + std::to_string(rss >> 20) + " MiB)");
    }
    if (cc1 < 0) cc1 = child_of((*child)->pid);
    if (cc1 > 0 && (rss = resident_bytes_of(cc1)) >= stop_at) break;
    if (std::chrono::steady_clock::now() > deadline) return fail("cc1plus did not grow to " + std::to_string(stop_at >> 20) + " MiB in 3 minutes");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (auto st = stop_and_wait(cc1); !st) return std::unexpected(st.error());
  auto dump = dump_resident(cc1, budget_pages);
  if (!dump) return std::unexpected(dump.error());
  Part part;
  part.info.name = "compiler";
  part.info.what = "cc1plus of `g++ -std=c++23 -O2 -c src/server/session.cc`, stopped at " +
                   std::to_string(resident_bytes_of(cc1) >> 20) + " MiB resident";
  part.info.resident_pages = dump->resident_pages;
  // Working set: let it run on, and collect the pages it writes, in order
  // (each scan of its memory is one tick of the order).
  std::vector<bool> seen(dump->vaddrs.size(), false);
  ::kill(cc1, SIGCONT);
  const auto until = std::chrono::steady_clock::now() + kCompilerResume;
  while (std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(kCompilerPoll);
    part.touches.push_back(newly_changed(cc1, *dump, seen));
  }
  if (auto st = stop_and_wait(cc1); !st) return std::unexpected(st.error());
  part.touches.push_back(newly_changed(cc1, *dump, seen));
  part.bytes = std::move(dump->bytes);
  return part;
}

Result<std::string> read_line(int fd, std::chrono::seconds timeout) {
  std::string line;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  char c = 0;
  while (true) {
    pollfd p{fd, POLLIN, 0};
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) return fail("the interpreter did not answer in time");
    const ssize_t n = ::read(fd, &c, 1);
    if (n <= 0) return fail("the interpreter exited");
    if (c == '\n') return line;
    line += c;
  }
}

Result<Part> take_interpreter(const CorpusOptions& o, uint64_t budget_pages) {
  const std::string script = o.work_dir + "/corpus-interpreter.py";
  {
    std::ofstream f(script);
    f << kInterpreterScript;
    if (!f) return fail("cannot write " + script);
  }
  // Debian's python3 (scripts/install-deps.sh), not whichever one PATH finds.
  auto child = spawn({"/usr/bin/python3", script}, true);
  if (!child) return std::unexpected(child.error());
  Child& py = **child;
  auto ready = read_line(py.from_child.get(), std::chrono::seconds(120));
  std::filesystem::remove(script);  // read by now
  if (!ready) return fail("/usr/bin/python3 did not start: " + ready.error().message);
  // It is blocked reading its stdin; stopped as well, like the compiler.
  if (auto st = stop_and_wait(py.pid); !st) return std::unexpected(st.error());
  auto dump = dump_resident(py.pid, budget_pages);
  if (!dump) return std::unexpected(dump.error());
  Part part;
  part.info.name = "interpreter";
  part.info.what = "/usr/bin/python3, " + ready->substr(ready->find(' ') + 1) +
                   " stdlib modules imported, a 60,000-record heap, waiting for a request";
  part.info.resident_pages = dump->resident_pages;
  std::vector<bool> seen(dump->vaddrs.size(), false);
  ::kill(py.pid, SIGCONT);
  for (int r = 0; r < kInterpreterRequests; ++r) {
    if (::write(py.to_child.get(), "go\n", 3) != 3) return fail_errno("cannot send a request to the interpreter");
    auto done = read_line(py.from_child.get(), std::chrono::seconds(60));
    if (!done) return std::unexpected(done.error());
    part.touches.push_back(newly_changed(py.pid, *dump, seen));
  }
  part.bytes = std::move(dump->bytes);
  return part;
}

void list_files(const std::string& root, std::vector<std::string>& out) {
  std::error_code ec;
  std::vector<std::string> found;
  for (auto it = std::filesystem::recursive_directory_iterator(root, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    if (it->is_regular_file(ec) && it->file_size(ec) > 0) found.push_back(it->path().string());
  }
  std::sort(found.begin(), found.end());
  out.insert(out.end(), found.begin(), found.end());
}

Part take_page_cache(uint64_t budget_pages) {
  // The files the two programs read, alternately: the interpreter's stdlib
  // sources and the compiler's C++ headers, as a guest's page cache holds
  // them (each file from a page boundary, the rest of its last page zero).
  std::vector<std::string> python, headers;
  list_files("/usr/lib/python3.11", python);
  list_files("/usr/include/c++/12", headers);
  Part part;
  part.info.name = "page cache";
  part.info.what = "files the programs read, alternately: /usr/lib/python3.11 and /usr/include/c++/12 (sorted)";
  size_t ip = 0, ih = 0;
  uint64_t files = 0;
  while (part.bytes.size() / kPage < budget_pages && (ip < python.size() || ih < headers.size())) {
    const bool take_python = (files % 2 == 0 && ip < python.size()) || ih >= headers.size();
    const std::string path = take_python ? python[ip++] : headers[ih++];
    std::string content = read_text(path);
    if (content.empty()) continue;
    content.resize((content.size() + kPage - 1) / kPage * kPage, '\0');
    const uint64_t room = (budget_pages - part.bytes.size() / kPage) * kPage;
    part.bytes.append(content, 0, std::min<uint64_t>(room, content.size()));
    ++files;
  }
  part.info.what += ", " + std::to_string(files) + " files";
  return part;
}

bool page_is_zero(const char* p) {
  for (uint64_t i = 0; i < kPage; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

}  // namespace

Result<CorpusReport> build_realistic_corpus(const CorpusOptions& o, const std::string& out_path,
                                            const std::string& working_set_path) {
  const auto t0 = std::chrono::steady_clock::now();
  if (o.size % (1ull << 20) != 0 || o.size < (8ull << 20)) return fail("corpus size must be a multiple of 1 MiB, at least 8 MiB", EINVAL);
  const uint64_t pages = o.size / kPage;
  std::vector<Part> parts;
  auto compiler = take_compiler(o, pages * 5 / 16);
  if (!compiler) return fail("compiler: " + compiler.error().message, compiler.error().code);
  parts.push_back(std::move(*compiler));
  auto interpreter = take_interpreter(o, pages / 8);
  if (!interpreter) return fail("interpreter: " + interpreter.error().message, interpreter.error().code);
  parts.push_back(std::move(*interpreter));
  parts.push_back(take_page_cache(pages / 16));

  // Chunks of every part, shuffled, with zero runs between them.
  struct Chunk {
    size_t part;
    uint64_t first, count;
  };
  std::vector<Chunk> chunks;
  uint64_t data_pages = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const uint64_t n = parts[i].bytes.size() / kPage;
    parts[i].info.pages = n;
    for (uint64_t p = 0; p < n; ++p) parts[i].info.zero_pages += page_is_zero(parts[i].bytes.data() + p * kPage);
    for (uint64_t p = 0; p < n; p += kChunkPages) chunks.push_back({i, p, std::min(kChunkPages, n - p)});
    data_pages += n;
  }
  if (data_pages > pages) return fail("the parts hold more pages than the corpus", EINVAL);
  std::mt19937_64 rng(o.seed);
  std::shuffle(chunks.begin(), chunks.end(), rng);
  const uint64_t zero_pages = pages - data_pages;
  const uint64_t between = zero_pages / 4;
  std::exponential_distribution<double> gap(1.0);
  std::vector<double> weights(chunks.size());
  double total = 0;
  for (size_t i = 1; i < chunks.size(); ++i) total += weights[i] = gap(rng);
  std::vector<uint64_t> gaps(chunks.size(), 0);
  for (size_t i = 1; i < chunks.size(); ++i) {
    gaps[i] = static_cast<uint64_t>(static_cast<double>(between) * weights[i] / total);
  }

  UniqueFd out(::open(out_path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644));
  if (!out) return fail_errno("cannot create " + out_path);
  // Zeros are written, not left as holes: a Full snapshot writes every byte.
  const std::string zeros(kChunkPages * kPage, '\0');
  auto write_all = [&](const char* p, uint64_t n) -> Status {
    while (n > 0) {
      const ssize_t w = ::write(out.get(), p, n);
      if (w <= 0) return fail_errno("write to " + out_path);
      p += w;
      n -= static_cast<uint64_t>(w);
    }
    return {};
  };
  auto write_zeros = [&](uint64_t n_pages) -> Status {
    for (uint64_t left = n_pages * kPage; left > 0;) {
      const uint64_t n = std::min<uint64_t>(left, zeros.size());
      if (auto st = write_all(zeros.data(), n); !st) return st;
      left -= n;
    }
    return {};
  };
  std::vector<std::vector<uint64_t>> offset_of(parts.size());
  for (size_t i = 0; i < parts.size(); ++i) offset_of[i].resize(parts[i].bytes.size() / kPage);
  uint64_t at = 0;
  for (size_t c = 0; c < chunks.size(); ++c) {
    if (auto st = write_zeros(gaps[c]); !st) return std::unexpected(st.error());
    at += gaps[c];
    const Chunk& k = chunks[c];
    if (auto st = write_all(parts[k.part].bytes.data() + k.first * kPage, k.count * kPage); !st) {
      return std::unexpected(st.error());
    }
    for (uint64_t p = 0; p < k.count; ++p) offset_of[k.part][k.first + p] = (at + p) * kPage;
    at += k.count;
  }
  if (auto st = write_zeros(pages - at); !st) return std::unexpected(st.error());

  // The working set: tick by tick, the pages each process wrote in it.
  WorkingSet ws;
  ws.page_size = kPage;
  ws.memory_file_size = o.size;
  size_t ticks = 0;
  for (Part& p : parts) {
    ticks = std::max(ticks, p.touches.size());
    p.info.working_set_ticks = p.touches.size();
  }
  for (size_t t = 0; t < ticks; ++t) {
    for (size_t i = 0; i < parts.size(); ++i) {
      if (t >= parts[i].touches.size()) continue;
      for (uint64_t page : parts[i].touches[t]) ws.offsets.push_back(offset_of[i][page]);
      parts[i].info.working_set_pages += parts[i].touches[t].size();
    }
  }
  if (auto st = write_working_set(working_set_path, ws); !st) return std::unexpected(st.error());

  CorpusReport report;
  report.size = o.size;
  report.pages = pages;
  report.zero_run_pages = zero_pages;
  report.zero_pages = zero_pages;
  for (Part& p : parts) {
    report.zero_pages += p.info.zero_pages;
    report.parts.push_back(std::move(p.info));
  }
  report.working_set_pages = ws.offsets.size();
  report.build_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report;
}

std::vector<std::string> describe_corpus(const CorpusReport& r) {
  std::vector<std::string> lines;
  auto pct = [&](uint64_t n) {
    char b[32];
    std::snprintf(b, sizeof b, "%.1f %%", 100.0 * static_cast<double>(n) / static_cast<double>(r.pages));
    return std::string(b);
  };
  auto mib = [](uint64_t pages) {
    char b[32];
    std::snprintf(b, sizeof b, "%.1f MiB", static_cast<double>(pages * kPage) / (1 << 20));
    return std::string(b);
  };
  lines.push_back("realistic corpus: " + mib(r.pages) + ", built in " + std::to_string(static_cast<int>(r.build_seconds + 0.5)) +
                  " s; all-zero pages " + pct(r.zero_pages) + " (" + mib(r.zero_run_pages) +
                  " of added zero runs, the rest touched zero-filled memory of the programs)");
  for (const CorpusPart& p : r.parts) {
    std::string line = "  " + p.name + ": " + mib(p.pages) + " (" + pct(p.pages) + " of the corpus, " +
                       std::to_string(p.zero_pages) + " of its pages all-zero)";
    if (p.resident_pages > 0) line += " of " + mib(p.resident_pages) + " resident";
    if (p.working_set_ticks > 0) {
      line += ", " + mib(p.working_set_pages) + " of it written in " + std::to_string(p.working_set_ticks) + " scans";
    }
    lines.push_back(line + "; " + p.what);
  }
  lines.push_back("  working set: " + std::to_string(r.working_set_pages) + " pages (" + mib(r.working_set_pages) +
                  "), the pages the programs wrote when resumed, in that order (bytes compared with the dump)");
  return lines;
}

}  // namespace faultline::bench
