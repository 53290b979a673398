// Command-line and output checks the orchestrator and pi0_bench share. Header-only: it needs
// CLI11, which only those programs link (pi0_common does not).
#pragma once

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>

#include <fcntl.h>
#include <unistd.h>

#include "pi0/check.hpp"

namespace pi0 {

// A refused value as written, quoted for its error line: a control character in it (the CR a
// value read from a CRLF file keeps, a newline) is written as an escape, so that the line stays
// one line and shows what was refused. "--rate $'5\r'" printed a CR that sent the cursor back
// over the line's start, and the value looked like a plain 5.
inline std::string quoted_value(std::string_view input) {
  std::string out = "'";
  for (const char c : input) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (byte < 0x20 || byte == 0x7f) {
      constexpr char kHex[] = "0123456789abcdef";
      out += {'\\', 'x', kHex[byte >> 4], kHex[byte & 15]};
    } else {
      out += c;  // UTF-8 ("١") stays as typed
    }
  }
  return out + "'";
}

// Integers are decimal. CLI11 reads "010" as 8 and "0x10" as 16, which nobody typing a frame
// count or a seed means: leading zeros are dropped here, and any other digit is refused.
inline CLI::Validator decimal_integer() {
  return CLI::Validator(
      [](std::string& input) -> std::string {
        const size_t first = input.find_first_not_of(" \t");
        const size_t last = input.find_last_not_of(" \t");
        std::string_view digits;
        if (first != std::string::npos)
          digits = std::string_view(input).substr(first, last - first + 1);
        std::string sign;
        if (!digits.empty() && (digits.front() == '-' || digits.front() == '+')) {
          sign = digits.front();
          digits.remove_prefix(1);
        }
        if (digits.empty() || digits.find_first_not_of("0123456789") != std::string_view::npos)
          return "expected a decimal integer, got " + quoted_value(input);
        const size_t significant = std::min(digits.find_first_not_of('0'), digits.size() - 1);
        input = sign + std::string(digits.substr(significant));
        return {};
      },
      "INTEGER");
}

// Real numbers are decimal and finite, and read as what was written. CLI11 takes whatever strtold
// does: "0x1p4" (16), "nan" (which CLI::Range lets through, every comparison with it being false),
// "inf" (a NaN or infinite time reaches float-to-integer casts as undefined behaviour), and
// "1e-400", which becomes 0 as a double, so that a rate too low to run read as "back to back" and
// a run timeout as "no limit". CLI::Range sees only the converted value: every real-valued option
// is checked here first.
inline CLI::Validator decimal_real() {
  return CLI::Validator(
      [](std::string& input) -> std::string {
        const size_t first = input.find_first_not_of(" \t");
        const size_t last = input.find_last_not_of(" \t");
        const std::string number =
            first == std::string::npos ? std::string() : input.substr(first, last - first + 1);
        // [+-] digits [. digits] [e [+-] digits], with digits on at least one side of the point.
        size_t at = 0;
        const auto digits = [&] {
          const size_t from = at;
          while (at < number.size() && number[at] >= '0' && number[at] <= '9') ++at;
          return at - from;
        };
        if (at < number.size() && (number[at] == '+' || number[at] == '-')) ++at;
        size_t mantissa = digits();
        if (at < number.size() && number[at] == '.') {
          ++at;
          mantissa += digits();
        }
        bool valid = mantissa > 0;
        if (valid && at < number.size() && (number[at] == 'e' || number[at] == 'E')) {
          ++at;
          if (at < number.size() && (number[at] == '+' || number[at] == '-')) ++at;
          valid = digits() > 0;
        }
        if (!valid || at != number.size())
          return "expected a finite decimal number, got " + quoted_value(input);
        // glibc's strtod says ERANGE where the value overflows, and where it underflows to 0 or
        // to a subnormal, which keeps fewer digits than were written.
        errno = 0;
        const double value = std::strtod(number.c_str(), nullptr);
        if (errno == ERANGE) {
          return quoted_value(input) + " is " +
                 (std::abs(value) > 1.0 ? "beyond the largest number a double holds (1.8e308)"
                                        : "closer to 0 than a double holds (2.2e-308)");
        }
        input = number;
        return {};
      },
      "DECIMAL");
}

// A results file the run would write at its end: checked before the run starts, so that a long
// run's figures are not lost to a path that cannot be written. Nothing is created or truncated
// here.
inline void check_writable(const std::string& path, const char* option) {
  if (path.empty()) return;
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path p(path);
  if (fs::is_directory(p, ec)) throw Error(std::string(option) + ": " + path + " is a directory");
  const bool exists = fs::exists(p, ec);
  // A link to a file not there yet is written where it points: its directory is the one to check
  // (a dangling link in a writable directory would pass, then fail after the run).
  fs::path created = p;
  for (int hops = 0; !exists && hops < 40 && fs::is_symlink(fs::symlink_status(created, ec));
       ++hops) {
    const fs::path next = fs::read_symlink(created, ec);
    if (ec) break;
    created = next.is_absolute() ? next : created.parent_path() / next;
  }
  const std::string target = exists                          ? path
                             : created.parent_path().empty() ? std::string(".")
                                                             : created.parent_path().string();
  // Before access(): a plain file has no search permission, which it would name instead.
  if (!exists && fs::exists(target, ec) && !fs::is_directory(target, ec)) {
    throw Error(std::string(option) + ": cannot write " + path + " (" + target +
                " is not a directory)");
  }
  const int mode = exists ? W_OK : W_OK | X_OK;
  if (::access(target.c_str(), mode) != 0) {
    throw Error(std::string(option) + ": cannot write " + path + " (" + target + ": " +
                std::strerror(errno) + ")");
  }
}

// Writes a results file at the run's end (replacing what it held). Opened without blocking, so
// that a FIFO no process reads, where open(2) would wait for a reader for ever, is an error naming
// it rather than a hang after the run; a pipe or FIFO with a reader (`--json >(jq .)`) is then
// written as usual.
inline void write_results_file(const std::string& path, std::string_view data) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NONBLOCK | O_CLOEXEC, 0666);
  if (fd < 0) {
    const int err = errno;
    throw Error("cannot write " + path + ": " +
                (err == ENXIO ? std::string("no process reads the FIFO") : std::strerror(err)));
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  int err = 0;
  for (size_t done = 0; done < data.size();) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      err = errno;
      break;
    }
    done += static_cast<size_t>(n);
  }
  if (::close(fd) != 0 && err == 0 && errno != EINTR) err = errno;
  if (err != 0) throw Error("cannot write " + path + ": " + std::strerror(err));
}

// What the program printed is a result as its files are: where standard output could not take it
// (a full disk, a closed pipe) the run has failed, not ended with exit 0 and nothing printed.
// Empty if everything printed so far was written; `what` names it ("the report", "the help").
// CLI11's help goes through std::cout, which shares stdout's buffer (synced with stdio, the
// default), so this sees it too.
inline std::string report_write_error(std::string_view what = "the report") {
  errno = 0;
  if (std::fflush(stdout) == 0 && !std::ferror(stdout)) return {};
  return "cannot write " + std::string(what) + " to standard output" +
         (errno ? std::string(": ") + std::strerror(errno) : std::string());
}

// The help, asked for: CLI11 prints it and gives its status, which is 1 with one line instead
// where standard output could not take it.
inline int exit_for_help(const CLI::App& app, const CLI::CallForHelp& help, const char* program) {
  const int code = app.exit(help);
  const std::string error = report_write_error("the help");
  if (error.empty()) return code;
  std::fprintf(stderr, "%s: error: %s\n", program, error.c_str());
  return 1;
}

// Whether two options name one file (the later write would replace the earlier's file).
inline bool same_file(const std::string& a, const std::string& b) {
  namespace fs = std::filesystem;
  if (a.empty() || b.empty()) return false;
  std::error_code ec;
  if (fs::exists(a, ec) && fs::exists(b, ec)) return fs::equivalent(a, b, ec);
  const fs::path ca = fs::weakly_canonical(a, ec);
  if (ec) return a == b;
  const fs::path cb = fs::weakly_canonical(b, ec);
  return ec ? a == b : ca == cb;
}

}  // namespace pi0
