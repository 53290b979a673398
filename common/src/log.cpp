#include "pi0/log.hpp"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "pi0/check.hpp"

namespace pi0 {

bool is_valid_log_level(const std::string& level) {
  return level == "trace" || level == "debug" || level == "info" || level == "warn" ||
         level == "error" || level == "off";
}

void init_logging(std::string_view process_name, const std::string& level) {
  PI0_CHECK(is_valid_log_level(level), "unknown log level '" + level +
                                           "' (use trace, debug, info, warn, error or off)");
  auto logger = spdlog::stderr_color_mt(std::string(process_name));
  logger->set_pattern("[%H:%M:%S.%e] [%n] [%^%l%$] %v");
  logger->set_level(spdlog::level::from_str(level));
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(logger);
}

}  // namespace pi0
