// The tuned-GEMM table's file format: what the bench writes, every process reads back the same,
// and a malformed file is refused with its name and line.
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "catch.hpp"
#include "pi0/check.hpp"
#include "pi0/cuda/gemm_table.hpp"

namespace {

namespace fs = std::filesystem;
using pi0::cuda::GemmAlgoConfig;
using pi0::cuda::GemmChoice;
using pi0::cuda::GemmTable;

const std::string kQkv =
    "gemm m=51 n=2560 k=1024 ld_x=1024 ld_w=2560 ld_y=2560 y=bf16 batch=1 align=256";
const std::string kDown =
    "gemm m=51 n=1024 k=4096 ld_x=4096 ld_w=1024 ld_y=1024 y=bf16 accumulate batch=1 align=256";

// The message parse() throws for `text`, or "" when it parses.
std::string parse_error(const std::string& text) {
  std::istringstream in(text);
  try {
    (void)GemmTable::parse(in, "table.tsv");
  } catch (const pi0::Error& e) {
    return e.what();
  }
  return "";
}

struct TempPath {
  std::string path;
  explicit TempPath(const std::string& tag)
      : path((fs::temp_directory_path() /
              ("pi0_test_gemm_table_" + std::to_string(::getpid()) + "_" + tag + ".tsv"))
                 .string()) {}
  ~TempPath() {
    std::error_code ec;
    fs::remove(path, ec);
    fs::remove(path + ".tmp", ec);
  }
};

}  // namespace

TEST_CASE("a gemm table written and read back gives the same choices") {
  GemmTable table;
  table.set(kQkv, GemmChoice{1, "algo 66 tile 13 stages 35 split-k 1 cluster 7"});
  table.set(kDown, GemmChoice{3, "algo 66 tile 316 stages 35 split-k 3 cluster 4"});
  table.set(kDown, GemmChoice{2, "algo 66 tile 316 stages 35 split-k 2 cluster 4"});  // replaces
  REQUIRE(table.size() == 2);

  std::ostringstream out;
  table.write(out);
  std::istringstream in(out.str());
  const GemmTable back = GemmTable::parse(in, "written");
  REQUIRE(back.size() == 2);
  REQUIRE(back.find(kQkv) != nullptr);
  CHECK(back.find(kQkv)->candidate == 1);
  CHECK(back.find(kQkv)->algo == "algo 66 tile 13 stages 35 split-k 1 cluster 7");
  REQUIRE(back.find(kDown) != nullptr);
  CHECK(back.find(kDown)->candidate == 2);
  CHECK(back.find(kDown)->algo == "algo 66 tile 316 stages 35 split-k 2 cluster 4");
  CHECK(back.find("gemm m=1 n=1 k=1") == nullptr);

  TempPath file("roundtrip");
  table.save(file.path);
  CHECK_FALSE(fs::exists(file.path + ".tmp"));
  const GemmTable loaded = GemmTable::load(file.path);
  REQUIRE(loaded.size() == 2);
  CHECK(loaded.find(kDown)->candidate == 2);
}

TEST_CASE("a gemm table skips comments and blank lines and accepts CRLF") {
  std::istringstream in("# tuned on one H100\n\n" + kQkv + "\t4\talgo 66 tile 13\r\n# end\n");
  const GemmTable table = GemmTable::parse(in, "crlf");
  REQUIRE(table.size() == 1);
  CHECK(table.find(kQkv)->candidate == 4);
  CHECK(table.find(kQkv)->algo == "algo 66 tile 13");
}

TEST_CASE("a malformed gemm table is refused with its line") {
  const std::string ok = kQkv + "\t1\talgo 66\n";
  CHECK(parse_error(ok).empty());
  CHECK(parse_error("# header\n" + kQkv + " 1 algo 66\n") ==
        "table.tsv line 2: want 'shape<TAB>candidate<TAB>description'");
  CHECK(parse_error(kQkv + "\t1\talgo 66\textra\n") ==
        "table.tsv line 1: want 'shape<TAB>candidate<TAB>description'");
  for (const std::string index : {"one", "10000", "+1", "-1", ""})
    CHECK(parse_error(kQkv + "\t" + index + "\talgo 66\n") ==
          "table.tsv line 1: candidate must be 0..9999, got '" + index + "'");
  CHECK(parse_error(kQkv + "\t9999\talgo 66\n").empty());
  CHECK(parse_error("\t1\talgo 66\n") == "table.tsv line 1: empty shape or description");
  // Keys no shape can equal: a trailing blank, a byte-order mark, another word.
  for (const std::string& key : {kQkv + " ", "\xef\xbb\xbf" + kQkv, std::string("shape m=1")})
    CHECK(parse_error(key + "\t1\talgo 66\n") ==
          "table.tsv line 1: the shape must be 'gemm m=...' as the table's writer gives it, with "
          "no blanks around it");
  CHECK(parse_error(kQkv + "\t1\t\n") == "table.tsv line 1: empty shape or description");
  CHECK(parse_error(ok + ok) == "table.tsv line 2: a second entry for '" + kQkv + "'");
}

TEST_CASE("a gemm table file that is missing or cannot be written is named") {
  const std::string missing =
      (fs::temp_directory_path() / ("pi0_no_such_table_" + std::to_string(::getpid()))).string();
  try {
    (void)GemmTable::load(missing);
    FAIL("loading a missing table did not throw");
  } catch (const pi0::Error& e) {
    CHECK(std::string(e.what()) ==
          "GEMM table " + missing + " cannot be opened: No such file or directory");
  }
  try {
    (void)GemmTable::load(fs::temp_directory_path().string());
    FAIL("loading a directory did not throw");
  } catch (const pi0::Error& e) {
    CHECK(std::string(e.what()) ==
          "GEMM table " + fs::temp_directory_path().string() + " is a directory");
  }
  GemmTable table;
  table.set(kQkv, GemmChoice{0, "algo 66"});
  CHECK_THROWS_AS(table.save(missing + "/dir/table.tsv"), pi0::Error);
}

TEST_CASE("a gemm table refuses entries it could not write on one line") {
  GemmTable table;
  CHECK_THROWS_AS(table.set("shape\twith a tab", GemmChoice{0, "algo"}), pi0::Error);
  CHECK_THROWS_AS(table.set(kQkv, GemmChoice{0, "algo\nsecond line"}), pi0::Error);
  CHECK_THROWS_AS(table.set(kQkv, GemmChoice{0, ""}), pi0::Error);
  CHECK_THROWS_AS(table.set(kQkv, GemmChoice{10000, "algo"}), pi0::Error);
  CHECK_THROWS_AS(table.set(kQkv, GemmChoice{-1, "algo"}), pi0::Error);
  // A line parse() would refuse as too long.
  CHECK_THROWS_AS(
      table.set(kQkv, GemmChoice{0, std::string(pi0::cuda::kMaxGemmTableLine - kQkv.size(), 'a')}),
      pi0::Error);
  CHECK(table.size() == 0);
}

// What a table entry names: a configuration that reads back field for field, so a Gemm can build it
// where the heuristic does not offer it; any other text is no configuration at all.
TEST_CASE("a gemm configuration's description reads back as the same configuration") {
  GemmAlgoConfig c;
  c.id = 66;  // every field its own value, so that swapping two fields shows
  c.tile = 12;
  c.stages = 35;
  c.split_k = 4;
  c.reduction = 2;
  c.swizzle = 1;
  c.custom = 3;
  c.inner = 7;
  c.cluster = 9;
  const std::string text = c.describe();
  CHECK(text ==
        "algo 66 tile 12 stages 35 split-k 4 reduction 2 swizzle 1 custom 3 inner 7 cluster 9");
  const auto back = GemmAlgoConfig::parse(text);
  REQUIRE(back.has_value());
  CHECK(*back == c);

  CHECK_FALSE(GemmAlgoConfig::parse("algo 66 tile 13 stages 35 split-k 1 cluster 7"));  // v13 form
  CHECK_FALSE(GemmAlgoConfig::parse(""));
  CHECK_FALSE(GemmAlgoConfig::parse(text + " extra"));
  CHECK_FALSE(GemmAlgoConfig::parse(
      "algo 66 tile 12 stages 35 split-k 0 reduction 2 swizzle 1 custom 3 inner 7 cluster 2"));
  CHECK_FALSE(GemmAlgoConfig::parse(
      "algo 66 tile -12 stages 35 split-k 4 reduction 2 swizzle 1 custom 3 inner 7 cluster 2"));
  CHECK_FALSE(GemmAlgoConfig::parse(
      "algo 66 tile 12 stages 35 split-k 4 reduction 2 swizzle 1 custom 3 inner 7 cluster 70000"));
  CHECK_FALSE(GemmAlgoConfig::parse(
      "algo 66 tiles 12 stages 35 split-k 4 reduction 2 swizzle 1 custom 3 inner 7 cluster 2"));
}

namespace {

// `bytes` zero bytes and no line end, as /dev/zero or a binary file gives: counts what was read.
class ZeroBytes : public std::streambuf {
 public:
  explicit ZeroBytes(size_t bytes) : left_(bytes) {}
  size_t served() const { return served_; }

 protected:
  int_type underflow() override {
    if (left_ == 0) return traits_type::eof();
    const size_t n = std::min(left_, sizeof block_);
    left_ -= n;
    served_ += n;
    setg(block_, block_, block_ + n);
    return traits_type::to_int_type(block_[0]);
  }

 private:
  char block_[4096] = {};
  size_t left_, served_ = 0;
};

}  // namespace

// PI0_GEMM_TABLE=/dev/zero (or a large file with no line ends) must not grow one line without
// bound: the line is refused once it is longer than any table's.
TEST_CASE("a gemm table line without an end is refused before it fills memory") {
  ZeroBytes zeros(size_t{64} << 20);
  std::istream in(&zeros);
  try {
    (void)GemmTable::parse(in, "zeros");
    FAIL("a line of 64 MiB parsed");
  } catch (const pi0::Error& e) {
    CHECK(std::string(e.what()) == "zeros line 1: longer than " +
                                       std::to_string(pi0::cuda::kMaxGemmTableLine) +
                                       " characters (not a GEMM table?)");
  }
  CHECK(zeros.served() < (size_t{1} << 20));
  // The longest line taken is read whole.
  const std::string longest =
      kQkv + "\t1\t" + std::string(pi0::cuda::kMaxGemmTableLine - kQkv.size() - 3, 'a');
  CHECK(parse_error(longest + "\n").empty());
  CHECK(parse_error(longest + "\r\n").empty());
  CHECK_FALSE(parse_error(longest + "a\n").empty());
}
