#include "pi0/cuda/gemm_table.hpp"

#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <sstream>
#include <type_traits>
#include <utility>

#include "pi0/check.hpp"

namespace pi0::cuda {
namespace {

std::mutex& recorder_mutex() {
  static std::mutex m;
  return m;
}
GemmTable& recorder() {
  static GemmTable table;
  return table;
}

// ScopedGemmTable's override: active while `overridden`.
struct Override {
  bool overridden = false;
  const GemmTable* table = nullptr;
};
Override& table_override() {
  static Override o;
  return o;
}

bool has_tab_or_newline(const std::string& s) {
  return s.find_first_of("\t\n\r") != std::string::npos;
}

// A decimal number of 1 to `max_digits` digits, without a sign.
bool plain_digits(const std::string& s, size_t max_digits) {
  return !s.empty() && s.size() <= max_digits &&
         s.find_first_not_of("0123456789") == std::string::npos;
}

// std::getline with a bound: stops once the line is longer than `max` characters (its line end and
// a CR before it not counted), so that a file without line ends (/dev/zero, a binary file) cannot
// grow one string until memory runs out. False at the end of the input, as std::getline.
bool read_bounded_line(std::istream& in, std::string& line, size_t max) {
  line.clear();
  for (int c; (c = in.get()) != std::char_traits<char>::eof();) {
    if (c == '\n') return true;
    line.push_back(static_cast<char>(c));
    if (line.size() > max + 1 || (line.size() == max + 1 && line.back() != '\r')) return true;
  }
  return !line.empty();  // a last line without its line end
}

}  // namespace

std::string GemmAlgoConfig::describe() const {
  std::ostringstream s;
  s << "algo " << id << " tile " << tile << " stages " << stages << " split-k " << split_k
    << " reduction " << reduction << " swizzle " << swizzle << " custom " << custom << " inner "
    << inner << " cluster " << cluster;
  return s.str();
}

std::optional<GemmAlgoConfig> GemmAlgoConfig::parse(const std::string& text) {
  GemmAlgoConfig c;
  std::istringstream in(text);
  // Each field: its keyword, then a decimal number without a sign.
  bool ok = true;
  auto field = [&](const char* keyword, auto& value) {
    std::string word, number;
    if (!ok || !(in >> word >> number) || word != keyword || !plain_digits(number, 9)) {
      ok = false;
      return;
    }
    value = static_cast<std::remove_reference_t<decltype(value)>>(std::stol(number));
  };
  field("algo", c.id);
  field("tile", c.tile);
  field("stages", c.stages);
  field("split-k", c.split_k);
  field("reduction", c.reduction);
  field("swizzle", c.swizzle);
  field("custom", c.custom);
  field("inner", c.inner);
  field("cluster", c.cluster);
  std::string rest;
  if (!ok || (in >> rest) || c.split_k < 1 || c.inner > 0xffff || c.cluster > 0xffff)
    return std::nullopt;
  return c;
}

GemmTable GemmTable::parse(std::istream& in, const std::string& source) {
  GemmTable table;
  std::string line;
  for (size_t number = 1; read_bounded_line(in, line, kMaxGemmTableLine); ++number) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    PI0_CHECK(line.size() <= kMaxGemmTableLine,
              source + " line " + std::to_string(number) + ": longer than " +
                  std::to_string(kMaxGemmTableLine) + " characters (not a GEMM table?)");
    if (line.empty() || line[0] == '#') continue;
    const std::string where = source + " line " + std::to_string(number);
    const size_t tab1 = line.find('\t');
    const size_t tab2 = tab1 == std::string::npos ? tab1 : line.find('\t', tab1 + 1);
    PI0_CHECK(tab2 != std::string::npos && line.find('\t', tab2 + 1) == std::string::npos,
              where + ": want 'shape<TAB>candidate<TAB>description'");
    const std::string shape = line.substr(0, tab1);
    const std::string index = line.substr(tab1 + 1, tab2 - tab1 - 1);
    GemmChoice choice;
    choice.algo = line.substr(tab2 + 1);
    PI0_CHECK(!shape.empty() && !choice.algo.empty(), where + ": empty shape or description");
    // A key no GemmShape::describe() can equal would never match, silently.
    PI0_CHECK(shape.rfind("gemm m=", 0) == 0 && shape.back() != ' ',
              where +
                  ": the shape must be 'gemm m=...' as the table's writer gives it, with no "
                  "blanks around it");
    const long candidate = plain_digits(index, 4) ? std::strtol(index.c_str(), nullptr, 10) : -1;
    PI0_CHECK(candidate >= 0 && candidate <= kMaxGemmTableIndex,
              where + ": candidate must be 0.." + std::to_string(kMaxGemmTableIndex) + ", got '" +
                  index + "'");
    PI0_CHECK(table.find(shape) == nullptr, where + ": a second entry for '" + shape + "'");
    choice.candidate = static_cast<int>(candidate);
    table.entries_.emplace(shape, std::move(choice));
  }
  PI0_CHECK(!in.bad(), source + ": read error");
  return table;
}

GemmTable GemmTable::load(const std::string& path) {
  std::error_code ec;
  PI0_CHECK(!std::filesystem::is_directory(path, ec), "GEMM table " + path + " is a directory");
  errno = 0;
  std::ifstream in(path);
  PI0_CHECK(in.is_open(), "GEMM table " + path + " cannot be opened" +
                              (errno ? std::string(": ") + std::strerror(errno) : std::string()));
  return parse(in, "GEMM table " + path);
}

void GemmTable::write(std::ostream& out) const {
  out << "# pi0 GEMM table: shape, where the kept configuration stood in the tuning list, the "
         "configuration\n";
  for (const auto& [shape, choice] : entries_)
    out << shape << '\t' << choice.candidate << '\t' << choice.algo << '\n';
}

void GemmTable::save(const std::string& path) const {
  const std::string temporary = path + ".tmp";
  bool written = false;
  {
    std::ofstream out(temporary, std::ios::trunc);
    PI0_CHECK(out.is_open(), "GEMM table " + temporary + " cannot be written");
    write(out);
    out.flush();
    written = out.good();
  }
  if (!written || std::rename(temporary.c_str(), path.c_str()) != 0) {
    (void)std::remove(temporary.c_str());
    throw Error("GEMM table " + path + (written ? " cannot be replaced" : ": write error"));
  }
}

void GemmTable::set(const std::string& shape, GemmChoice choice) {
  PI0_CHECK(!shape.empty() && !has_tab_or_newline(shape) && !choice.algo.empty() &&
                !has_tab_or_newline(choice.algo),
            "GEMM table: a shape or description that cannot be written on one line");
  // What parse() would refuse to read back (a candidate has up to 4 digits; two tabs).
  PI0_CHECK(shape.size() + choice.algo.size() + 6 <= kMaxGemmTableLine,
            "GEMM table: a shape and description longer than a table line may be");
  PI0_CHECK(choice.candidate >= 0 && choice.candidate <= kMaxGemmTableIndex,
            "GEMM table: candidate " + std::to_string(choice.candidate) + " out of range");
  entries_[shape] = std::move(choice);
}

const GemmChoice* GemmTable::find(const std::string& shape) const {
  const auto it = entries_.find(shape);
  return it == entries_.end() ? nullptr : &it->second;
}

const GemmTable* process_gemm_table() {
  if (table_override().overridden) return table_override().table;
  // A load that throws leaves this uninitialised, so the next Gemm reports the same error.
  static const std::optional<GemmTable> table = []() -> std::optional<GemmTable> {
    const char* path = std::getenv("PI0_GEMM_TABLE");
    if (path == nullptr || *path == '\0') return std::nullopt;
    GemmTable loaded = GemmTable::load(path);
    // A table with no entries changes nothing: say so, since it was asked for.
    if (loaded.size() == 0)
      spdlog::warn("GEMM table {} has no entries: every GEMM takes cuBLASLt's heuristic", path);
    else
      spdlog::info("GEMM table {}: {} entries", path, loaded.size());
    return loaded;
  }();
  return table ? &*table : nullptr;
}

ScopedGemmTable::ScopedGemmTable(const GemmTable* table)
    : previous_(table_override().table), had_previous_(table_override().overridden) {
  table_override() = Override{true, table};
}

ScopedGemmTable::~ScopedGemmTable() {
  table_override() = Override{had_previous_, previous_};
}

GemmTable tuned_gemm_choices() {
  std::lock_guard<std::mutex> lock(recorder_mutex());
  return recorder();
}

void record_tuned_gemm_choice(const std::string& shape, const GemmChoice& choice) {
  std::lock_guard<std::mutex> lock(recorder_mutex());
  recorder().set(shape, choice);
}

}  // namespace pi0::cuda
