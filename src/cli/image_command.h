// `faultline image ...`: the offline image commands (create, inspect, verify,
// flatten, gc), built on src/image/operations.h.
#pragma once

#include <CLI/CLI.hpp>
#include <memory>

namespace faultline::cli {

class ImageCommand {
 public:
  // Adds the `image` subcommand and its own subcommands to `app`.
  explicit ImageCommand(CLI::App& app);
  ~ImageCommand();
  bool parsed() const;
  // Runs the parsed subcommand; returns the process exit code.
  int run();

 private:
  struct Options;
  std::unique_ptr<Options> options_;
};

}  // namespace faultline::cli
