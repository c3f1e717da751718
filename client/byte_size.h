// Byte sizes as people type them on a command line: "4096", "64K", "256M",
// "2G", "1.5G" (binary units; an optional trailing "iB"/"B" is accepted), and
// comma-separated lists of them ("64M,32M").
//
// Pure functions; safe from any thread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"

namespace faultline::client {

Result<uint64_t> parse_byte_size(std::string_view text);
Result<std::vector<uint64_t>> parse_byte_size_list(std::string_view text);

// "256 MiB", "4 KiB", "3 GiB", or bytes when not a whole number of KiB.
std::string format_byte_size(uint64_t bytes);

}  // namespace faultline::client
