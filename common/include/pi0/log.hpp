// spdlog set up so that every line names the process it comes from.
#pragma once

#include <string>
#include <string_view>

namespace pi0 {

// Installs the default logger, writing to stderr as "[time] [process] [level] message".
// level: trace, debug, info, warn, error, off. Throws pi0::Error for an unknown level.
void init_logging(std::string_view process_name, const std::string& level);

bool is_valid_log_level(const std::string& level);

}  // namespace pi0
