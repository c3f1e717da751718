// `faultline image ...` as an operator runs it: separate processes, exit
// codes, the lines it prints, and the files it leaves.
#include <filesystem>

#include <nlohmann/json.hpp>

#include "harness.h"

namespace faultline::testing {
namespace {

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

TEST(ImageCli, CreateInspectVerifyFlattenAndGcEndToEnd) {
  TempDir dir;
  const std::string store = dir.file("store");
  ASSERT_TRUE(client::write_test_memory_file(dir.file("base.mem"), 8 * kMiB, 21, 0.3));
  std::string next = read_file(dir.file("base.mem"));
  for (uint64_t p : {3, 4, 5, 1000}) {
    client::fill_write_pattern(1, p * 4096, {reinterpret_cast<uint8_t*>(next.data() + p * 4096), 4096});
  }
  write_bytes(dir.file("next.mem"), next);

  CommandRun c = run_faultline(dir, {"image", "create", "--from", dir.file("base.mem"), "--store", store, "--name", "base"});
  ASSERT_EQ(c.exit_code, 0) << c.output;
  EXPECT_NE(c.output.find("image base: 2048 pages"), std::string::npos) << c.output;
  EXPECT_NE(c.output.find("creating base: 100.0 %"), std::string::npos) << "a progress line on stderr: " << c.output;
  c = run_faultline(dir, {"image", "create", "--from", dir.file("next.mem"), "--store", store, "--name", "next",
                          "--parent", "base", "--level", "5", "--frame-pages", "64"});
  ASSERT_EQ(c.exit_code, 0) << c.output;
  EXPECT_NE(c.output.find("4 stored"), std::string::npos) << c.output;
  // Images are immutable.
  c = run_faultline(dir, {"image", "create", "--from", dir.file("next.mem"), "--store", store, "--name", "next"});
  EXPECT_EQ(c.exit_code, 1);
  EXPECT_NE(c.output.find("exists already"), std::string::npos) << c.output;

  CommandRun i = run_faultline(dir, {"image", "inspect", "--store", store, "--name", "next", "--json"});
  ASSERT_EQ(i.exit_code, 0) << i.output;
  auto j = nlohmann::json::parse(i.output, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << i.output;
  ASSERT_EQ(j["layers"].size(), 2u);
  EXPECT_EQ(j["layers"][0]["name"], "next");
  EXPECT_EQ(j["layers"][0]["parent"], "base");
  EXPECT_EQ(j["layers"][0]["pages"]["stored"], 4);
  EXPECT_EQ(j["layers"][1]["parent"], nullptr);
  EXPECT_EQ(j["layers"][0]["version"], 2) << "create writes manifest version 2";
  EXPECT_EQ(j["page_size"], 4096);
  EXPECT_EQ(j["guest_bytes"], 8 * kMiB);
  i = run_faultline(dir, {"image", "inspect", "--store", store, "--name", "next"});
  ASSERT_EQ(i.exit_code, 0) << i.output;
  EXPECT_NE(i.output.find("compression ratio"), std::string::npos) << i.output;
  EXPECT_NE(i.output.find("(version 2)"), std::string::npos) << i.output;

  CommandRun v = run_faultline(dir, {"image", "verify", "--store", store, "--name", "next"});
  ASSERT_EQ(v.exit_code, 0) << v.output;
  EXPECT_NE(v.output.find("image next: ok (2 layers"), std::string::npos) << v.output;

  CommandRun f = run_faultline(dir, {"image", "flatten", "--store", store, "--name", "next", "--out", dir.file("flat")});
  ASSERT_EQ(f.exit_code, 0) << f.output;
  EXPECT_TRUE(read_file(dir.file("flat")) == next) << "flatten is byte-identical to the file next was made from";

  CommandRun g = run_faultline(dir, {"image", "gc", "--store", store});
  ASSERT_EQ(g.exit_code, 0) << g.output;
  EXPECT_NE(g.output.find("removed 0 of"), std::string::npos) << g.output;

  // list: both images, each with its parent and what it stores itself.
  CommandRun l = run_faultline(dir, {"image", "list", "--store", store, "--json"});
  ASSERT_EQ(l.exit_code, 0) << l.output;
  auto listed = nlohmann::json::parse(l.output, nullptr, false);
  ASSERT_TRUE(listed.is_array()) << l.output;
  ASSERT_EQ(listed.size(), 2u) << l.output;
  EXPECT_EQ(listed[0]["name"], "base");
  EXPECT_EQ(listed[0]["parent"], nullptr);
  EXPECT_EQ(listed[0]["guest_bytes"], 8 * kMiB);
  EXPECT_EQ(listed[1]["name"], "next");
  EXPECT_EQ(listed[1]["parent"], "base");
  EXPECT_EQ(listed[1]["stored_pages"], 4);
  EXPECT_EQ(listed[1]["version"], 2);
  l = run_faultline(dir, {"image", "list", "--store", store});
  ASSERT_EQ(l.exit_code, 0) << l.output;
  EXPECT_NE(l.output.find("next: parent base; guest 8.0 MiB"), std::string::npos) << l.output;

  // delete: a parent is refused while its child exists; the child, then the
  // base, are deleted, and gc frees every frame they held.
  CommandRun d = run_faultline(dir, {"image", "delete", "--store", store, "--name", "base"});
  EXPECT_EQ(d.exit_code, 1) << d.output;
  EXPECT_NE(d.output.find("image base not deleted: it is the parent of next"), std::string::npos) << d.output;
  d = run_faultline(dir, {"image", "delete", "--store", store, "--name", "next"});
  ASSERT_EQ(d.exit_code, 0) << d.output;
  EXPECT_NE(d.output.find("image next deleted"), std::string::npos) << d.output;
  d = run_faultline(dir, {"image", "delete", "--store", store, "--name", "base"});
  ASSERT_EQ(d.exit_code, 0) << d.output;
  l = run_faultline(dir, {"image", "list", "--store", store, "--json"});
  ASSERT_EQ(l.exit_code, 0) << l.output;
  EXPECT_EQ(nlohmann::json::parse(l.output, nullptr, false), nlohmann::json::array()) << l.output;
  g = run_faultline(dir, {"image", "gc", "--store", store});
  ASSERT_EQ(g.exit_code, 0) << g.output;
  size_t blobs_left = 0;
  for (auto& e : std::filesystem::recursive_directory_iterator(store + "/blobs")) blobs_left += e.is_regular_file();
  EXPECT_EQ(blobs_left, 0u) << g.output;
}

TEST(ImageCli, DamagedFrameFailsVerifyAndFlattenNamingImageAndBlob) {
  TempDir dir;
  const std::string store = dir.file("store");
  ASSERT_TRUE(client::write_test_memory_file(dir.file("mem"), 2 * kMiB, 22, 0.1));
  ASSERT_EQ(run_faultline(dir, {"image", "create", "--from", dir.file("mem"), "--store", store, "--name", "img",
                                "--quiet"})
                .exit_code,
            0);
  std::string blob_path;
  for (auto& e : std::filesystem::recursive_directory_iterator(store + "/blobs")) {
    if (e.is_regular_file()) blob_path = e.path().string();
  }
  ASSERT_FALSE(blob_path.empty());
  const std::string hex = std::filesystem::path(blob_path).filename().string();
  std::string blob = read_file(blob_path);
  blob[blob.size() / 3] ^= 0x40;
  std::filesystem::remove(blob_path);
  write_bytes(blob_path, blob);

  CommandRun v = run_faultline(dir, {"image", "verify", "--store", store, "--name", "img", "--quiet"});
  EXPECT_EQ(v.exit_code, 1) << v.output;
  EXPECT_NE(v.output.find("image img"), std::string::npos) << v.output;
  EXPECT_NE(v.output.find(hex), std::string::npos) << v.output;
  CommandRun f = run_faultline(dir, {"image", "flatten", "--store", store, "--name", "img", "--out", dir.file("flat"),
                              "--quiet"});
  EXPECT_EQ(f.exit_code, 1) << f.output;
  EXPECT_NE(f.output.find(hex), std::string::npos) << f.output;
  EXPECT_FALSE(std::filesystem::exists(dir.file("flat")));
}

TEST(ImageCli, EverySubcommandHasHelpAndBadNamesAreRefused) {
  TempDir dir;
  for (const char* sub : {"create", "list", "inspect", "verify", "flatten", "delete", "gc", "push", "pull"}) {
    CommandRun h = run_faultline(dir, {"image", sub, "--help"});
    EXPECT_EQ(h.exit_code, 0) << sub << ": " << h.output;
    EXPECT_NE(h.output.find("--store"), std::string::npos) << sub << ": " << h.output;
  }
  ASSERT_TRUE(client::write_test_memory_file(dir.file("mem"), 1 * kMiB, 23, 0.1));
  for (const char* name : {"../escape", "a/b", ".hidden"}) {
    CommandRun c = run_faultline(dir, {"image", "create", "--from", dir.file("mem"), "--store", dir.file("store"), "--name",
                                name});
    EXPECT_EQ(c.exit_code, 1) << name << ": " << c.output;
    EXPECT_NE(c.output.find("bad image name"), std::string::npos) << c.output;
  }
  CommandRun missing = run_faultline(dir, {"image", "verify", "--store", dir.file("store"), "--name", "nothere"});
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_NE(missing.output.find("image nothere does not exist"), std::string::npos) << missing.output;
}


// The daemon serving an image as a user runs it: `image create`, then
// `serve --image STORE/NAME`, then a VM restored through the real handshake
// by a separate process that checks every byte against the file.
TEST(ImageCli, ServeImageRestoresAVmWithEveryByteOfTheFile) {
  TempDir dir;
  const std::string store = dir.file("store");
  ASSERT_TRUE(client::write_test_memory_file(dir.file("mem"), 16 * kMiB, 5, 0.2));
  CommandRun c = run_faultline(dir, {"image", "create", "--from", dir.file("mem"), "--store", store, "--name", "vm"});
  ASSERT_EQ(c.exit_code, 0) << c.output;

  const std::string sock = dir.file("vm.sock");
  const std::string log = dir.file("serve.log");
  const pid_t daemon = spawn({built_binary("faultline"), "serve", "--socket", sock, "--image", store + "/vm",
                              "--frame-cache-size", "8388608", "--on-fatal", "leave"},
                             log);
  ASSERT_GT(daemon, 0);
  ASSERT_TRUE(eventually_true([&] { return read_file(log).find("event=server_start") != std::string::npos; }))
      << read_file(log);
  const std::string out = dir.file("client.out");
  const pid_t vm = spawn({built_binary("faultline-client"), "restore", "--socket", sock, "--memory", dir.file("mem"),
                          "--threads", "2"},
                         out);
  const int status = wait_child(vm, std::chrono::seconds(120));
  // The VM's exit closes its socket; the daemon ends the session when it
  // reads that close. Stopped before then, it would end it as `stopped`.
  const bool session_ended =
      eventually_true([&] { return read_file(log).find("event=session_end") != std::string::npos; });
  ::kill(daemon, SIGTERM);
  const int daemon_status = wait_child(daemon, std::chrono::seconds(30));
  ASSERT_TRUE(WIFEXITED(status)) << read_file(out);
  EXPECT_EQ(WEXITSTATUS(status), 0) << read_file(out);
  EXPECT_NE(read_file(out).find("mismatches        0\n"), std::string::npos) << read_file(out);
  EXPECT_TRUE(session_ended) << read_file(log);
  ASSERT_TRUE(WIFEXITED(daemon_status));
  EXPECT_EQ(WEXITSTATUS(daemon_status), 0);
  const std::string served = read_file(log);
  EXPECT_NE(served.find("image_layers=1"), std::string::npos) << served;
  EXPECT_NE(served.find("frame_cache_bytes=8388608"), std::string::npos) << served;
  EXPECT_NE(served.find("state=socket_closed"), std::string::npos) << served;
}

// What an operator sees: `image delete` of an image a daemon serves is
// refused, naming the daemon; `image list` says who serves it. A daemon
// that stops lets go; one that is killed leaves a stale lease that delete
// and gc see through and remove.
TEST(ImageCli, DeleteIsRefusedWhileADaemonServesTheImageAndAKilledDaemonHoldsNothing) {
  TempDir dir;
  const std::string store = dir.file("store");
  ASSERT_TRUE(client::write_test_memory_file(dir.file("mem"), 4 * kMiB, 6, 0.2));
  for (const char* name : {"a", "b"}) {
    CommandRun c = run_faultline(dir, {"image", "create", "--from", dir.file("mem"), "--store", store, "--name", name});
    ASSERT_EQ(c.exit_code, 0) << c.output;
  }
  const auto start_daemon = [&](const std::string& image, const std::string& log) {
    const pid_t pid = spawn(
        {built_binary("faultline"), "serve", "--socket", dir.file(image + ".sock"), "--image", store + "/" + image},
        log);
    EXPECT_TRUE(eventually_true([&] { return read_file(log).find("event=server_start") != std::string::npos; }))
        << read_file(log);
    return pid;
  };
  const pid_t stopped = start_daemon("a", dir.file("a.log"));
  const pid_t killed = start_daemon("b", dir.file("b.log"));
  ASSERT_GT(stopped, 0);
  ASSERT_GT(killed, 0);

  CommandRun d = run_faultline(dir, {"image", "delete", "--store", store, "--name", "a"});
  EXPECT_EQ(d.exit_code, 1) << d.output;
  EXPECT_NE(d.output.find("not deleted: it is being served by pid " + std::to_string(stopped)), std::string::npos)
      << d.output;
  CommandRun l = run_faultline(dir, {"image", "list", "--store", store});
  EXPECT_NE(l.output.find("served by pid " + std::to_string(stopped)), std::string::npos) << l.output;
  EXPECT_NE(l.output.find("served by pid " + std::to_string(killed)), std::string::npos) << l.output;
  l = run_faultline(dir, {"image", "list", "--store", store, "--json"});
  ASSERT_EQ(l.exit_code, 0) << l.output;
  auto images = nlohmann::json::parse(l.output.substr(0, l.output.find('\n')));
  ASSERT_EQ(images.size(), 2u);
  ASSERT_EQ(images[0]["served_by"].size(), 1u);
  EXPECT_EQ(images[0]["served_by"][0]["pid"], stopped);

  ::kill(stopped, SIGTERM);
  const int stopped_status = wait_child(stopped, std::chrono::seconds(30));
  EXPECT_TRUE(WIFEXITED(stopped_status) && WEXITSTATUS(stopped_status) == 0) << read_file(dir.file("a.log"));
  ::kill(killed, SIGKILL);
  wait_child(killed, std::chrono::seconds(30));
  // The stopped daemon removed its lease; the killed one's is left, stale.
  size_t lease_files = 0;
  for (const auto& e : std::filesystem::directory_iterator(store + "/leases")) lease_files += e.is_regular_file();
  EXPECT_EQ(lease_files, 1u);

  l = run_faultline(dir, {"image", "list", "--store", store});
  EXPECT_EQ(l.output.find("served by"), std::string::npos) << l.output;
  CommandRun g = run_faultline(dir, {"image", "gc", "--store", store});
  EXPECT_EQ(g.exit_code, 0) << g.output;
  EXPECT_NE(g.output.find("1 stale leases removed"), std::string::npos) << g.output;
  d = run_faultline(dir, {"image", "delete", "--store", store, "--name", "a"});
  EXPECT_EQ(d.exit_code, 0) << d.output;
  d = run_faultline(dir, {"image", "delete", "--store", store, "--name", "b"});
  EXPECT_EQ(d.exit_code, 0) << d.output;
}

TEST(ImageCli, ServeNeedsExactlyOneOfMemoryAndImage) {
  TempDir dir;
  ASSERT_TRUE(client::write_test_memory_file(dir.file("mem"), 4 * kMiB, 5, 0.2));
  CommandRun none = run_faultline(dir, {"serve", "--socket", dir.file("a.sock")});
  EXPECT_EQ(none.exit_code, 2) << none.output;
  EXPECT_NE(none.output.find("--memory FILE or --image STORE_DIR/NAME"), std::string::npos) << none.output;
  CommandRun both =
      run_faultline(dir, {"serve", "--socket", dir.file("b.sock"), "--memory", dir.file("mem"), "--image", "x/y"});
  EXPECT_NE(both.exit_code, 0) << both.output;
  EXPECT_NE(both.output.find("excludes"), std::string::npos) << both.output;
  CommandRun missing = run_faultline(dir, {"serve", "--socket", dir.file("c.sock"), "--image", dir.file("nostore") + "/vm"});
  EXPECT_EQ(missing.exit_code, 1) << missing.output;
  EXPECT_NE(missing.output.find("startup_failed"), std::string::npos) << missing.output;
  EXPECT_NE(missing.output.find("nostore"), std::string::npos) << missing.output;
}

}  // namespace
}  // namespace faultline::testing
