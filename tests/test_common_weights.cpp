// Weight specs, random weights, and the .safetensors loader's validation.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if __has_include(<omp.h>)
#include <omp.h>
#define PI0_TEST_HAVE_OMP 1
#endif

#include "catch.hpp"
#include "pi0/check.hpp"
#include "pi0/random.hpp"
#include "pi0/weights.hpp"

namespace {

namespace fs = std::filesystem;

// A scratch file removed at the end of the test.
struct TempFile {
  std::string path;
  explicit TempFile(const std::string& tag) {
    path = (fs::temp_directory_path() /
            ("pi0_test_weights_" + std::to_string(::getpid()) + "_" + tag + ".safetensors"))
               .string();
  }
  ~TempFile() {
    std::error_code ec;
    fs::remove(path, ec);
  }
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A safetensors file's 8-byte little-endian header length, read from its bytes and written.
uint64_t header_length(const std::string& file_bytes) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(file_bytes[i]);
  return n;
}
std::string length_prefix(uint64_t n) {
  std::string length(8, '\0');
  for (int i = 0; i < 8; ++i) length[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return length;
}

// Saves `store` to `path` and returns the file's bytes.
std::string save_and_read(const pi0::WeightStore& store, const std::string& path) {
  store.save_safetensors(path);
  return read_bytes(path);
}

// Every tensor `got` holds has the shape and bytes of the one of that name in `want`.
void require_tensors_of(const pi0::WeightStore& got, const pi0::WeightStore& want) {
  for (const auto& [name, view] : got.tensors()) {
    INFO(name);
    const pi0::TensorView& original = want.get(name);
    REQUIRE(view.shape == original.shape);
    REQUIRE(std::memcmp(view.data, original.data, view.numel * 2) == 0);
  }
}

// One header entry as the hand-written files below spell it.
struct Entry {
  std::string name;
  std::string dtype = "BF16";
  std::string shape;    // JSON text, e.g. "[2,64]"
  std::string offsets;  // JSON text, e.g. "[0,256]"
  bool include = true;
};

// Writes the tensors of `store` with a header built by hand, after `edit` has changed entries,
// so that tests can produce files the library's own writer never would.
void write_edited(const std::string& path, const pi0::WeightStore& store,
                  const std::function<void(std::vector<Entry>&)>& edit) {
  std::vector<Entry> entries;
  std::string data;
  for (const auto& [name, view] : store.tensors()) {
    Entry e;
    e.name = name;
    std::string shape(1, '[');
    for (size_t i = 0; i < view.shape.size(); ++i) {
      if (i) shape += ',';
      shape += std::to_string(view.shape[i]);
    }
    e.shape = shape + ']';
    const size_t begin = data.size();
    data.append(reinterpret_cast<const char*>(view.data), view.numel * 2);
    e.offsets = std::string("[").append(std::to_string(begin)).append(",");
    e.offsets.append(std::to_string(data.size())).append("]");
    entries.push_back(e);
  }
  edit(entries);
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  for (const Entry& e : entries) {
    if (!e.include) continue;
    header += ",\"" + e.name + "\":{\"dtype\":\"" + e.dtype + "\",\"shape\":" + e.shape +
              ",\"data_offsets\":" + e.offsets + "}";
  }
  header += "}";
  write_bytes(path, length_prefix(header.size()) + header + data);
}

Entry& find_entry(std::vector<Entry>& entries, const std::string& name) {
  for (Entry& e : entries)
    if (e.name == name) return e;
  throw std::runtime_error("test: no entry " + name);
}

// The message of the pi0::Error that loading `path` throws ("" if none).
std::string load_error(const std::string& path, const pi0::ModelConfig& c,
                       pi0::WeightSet set = pi0::WeightSet::kAll) {
  try {
    (void)pi0::WeightStore::load_safetensors(path, c, set);
  } catch (const pi0::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// A store saved at a path, split into its header text and its data section, so that a test can
// load the same data under another header.
struct SavedParts {
  std::string path, header, data;
};
SavedParts save_parts(const pi0::WeightStore& store, const std::string& path) {
  const std::string bytes = save_and_read(store, path);
  const uint64_t header_len = header_length(bytes);
  return {path, bytes.substr(8, header_len), bytes.substr(8 + header_len)};
}
// The error of loading the saved data under header `text` ("" if none).
std::string load_error_with_header(const SavedParts& saved, const std::string& text,
                                   const pi0::ModelConfig& c) {
  write_bytes(saved.path, length_prefix(text.size()) + text + saved.data);
  return load_error(saved.path, c);
}

}  // namespace

TEST_CASE("weight specs follow the spec table", "[common]") {
  const pi0::ModelConfig pi0c = pi0::model_config("pi0");
  const auto all = pi0::weight_specs(pi0c, 0, pi0::WeightSet::kAll);
  REQUIRE(all.size() == 38);
  size_t total = 0;
  for (const auto& s : all) total += s.numel();
  // The spec: about 2.7 B parameters, 5.05 GiB in bf16.
  REQUIRE(total > 2.6e9);
  REQUIRE(total < 2.8e9);
  REQUIRE(std::abs(total * 2.0 / (1024.0 * 1024 * 1024) - 5.05) < 0.05);

  auto find = [&](const std::string& name) {
    for (const auto& s : all)
      if (s.name == name) return s;
    FAIL("no spec " << name);
    return all.front();
  };
  REQUIRE(find("vision_patch_embedding_w").shape == std::vector<int64_t>{14, 14, 3, 1152});
  REQUIRE(find("vision_patch_embedding_w").fan_in == 588);
  REQUIRE(find("vision_attn_qkv_w").shape == std::vector<int64_t>{27, 1152, 3456});
  REQUIRE(find("vision_ffn_up_w").shape == std::vector<int64_t>{27, 1152, 4304});
  REQUIRE(find("vision_ffn_down_w").fan_in == 4304);
  REQUIRE(find("encoder_attn_qkv_w").shape == std::vector<int64_t>{18, 2048, 2560});
  REQUIRE(find("encoder_attn_o_w").shape == std::vector<int64_t>{18, 2048, 2048});
  REQUIRE(find("encoder_ffn_down_w").shape == std::vector<int64_t>{18, 16384, 2048});
  REQUIRE(find("decoder_attn_qkv_w").shape == std::vector<int64_t>{18, 1024, 2560});
  REQUIRE(find("decoder_attn_o_w").shape == std::vector<int64_t>{18, 2048, 1024});
  REQUIRE(find("decoder_attn_o_w").fan_in == 2048);
  REQUIRE(find("decoder_action_fused_time_biases").shape == std::vector<int64_t>{10, 1024});
  REQUIRE(find("decoder_action_fused_time_biases").init_std == 0.02f);
  REQUIRE(find("decoder_action_fused_out_proj_w").shape == std::vector<int64_t>{1024, 32});
  REQUIRE(find("vision_pre_attn_norm_w").init_one);
  REQUIRE(find("vision_attn_qkv_b").init_std == 0.0f);
  REQUIRE(find("language_embeds").shape == std::vector<int64_t>{0, 2048});

  // The encoder and decoder sets split the table without overlap.
  const auto enc = pi0::weight_specs(pi0c, 20, pi0::WeightSet::kEncoder);
  const auto dec = pi0::weight_specs(pi0c, 20, pi0::WeightSet::kDecoder);
  REQUIRE(enc.size() + dec.size() == all.size());
  for (const auto& s : dec) REQUIRE(s.name.rfind("decoder_", 0) == 0);
  for (const auto& s : enc) REQUIRE(s.name.rfind("decoder_", 0) != 0);
  REQUIRE(enc.back().name == "language_embeds");
  REQUIRE(enc.back().shape == std::vector<int64_t>{20, 2048});

  const pi0::ModelConfig tiny = pi0::model_config("tiny");
  for (const auto& s : pi0::weight_specs(tiny, 0, pi0::WeightSet::kAll)) {
    if (s.name == "encoder_attn_qkv_w") REQUIRE(s.shape == std::vector<int64_t>{2, 64, 128});
    if (s.name == "vision_position_embedding") REQUIRE(s.shape == std::vector<int64_t>{16, 48});
  }
}

TEST_CASE("random weights follow their specs and seed", "[common]") {
  const pi0::ModelConfig c = pi0::model_config("tiny");
  const auto a = pi0::WeightStore::random(c, 3, 1, pi0::WeightSet::kAll);
  const auto b = pi0::WeightStore::random(c, 3, 1, pi0::WeightSet::kAll);
  const auto other = pi0::WeightStore::random(c, 3, 2, pi0::WeightSet::kAll);
  REQUIRE(a.prompt_len() == 3);
  size_t expected_bytes = 0;
  for (const auto& s : pi0::weight_specs(c, 3, pi0::WeightSet::kAll)) {
    const pi0::TensorView& t = a.get(s.name);
    REQUIRE(t.shape == s.shape);
    REQUIRE(t.numel == s.numel());
    expected_bytes += s.numel() * 2;
    REQUIRE(std::memcmp(t.data, b.get(s.name).data, t.numel * 2) == 0);
    double sum_sq = 0.0;
    for (size_t i = 0; i < t.numel; ++i) {
      const float v = pi0::bf16_to_float(t.data[i]);
      if (s.init_one) REQUIRE(v == 1.0f);
      if (!s.init_one && s.init_std == 0.0f) REQUIRE(v == 0.0f);
      sum_sq += static_cast<double>(v) * v;
    }
    if (s.init_std > 0.0f && t.numel >= 1000) {
      const double std = std::sqrt(sum_sq / t.numel);
      INFO(s.name);
      REQUIRE(std::abs(std / s.init_std - 1.0) < 0.1);
      REQUIRE(std::memcmp(t.data, other.get(s.name).data, t.numel * 2) != 0);
    }
  }
  REQUIRE(a.total_bytes() == expected_bytes);
  REQUIRE(a.has("vision_final_norm_w"));
  REQUIRE_FALSE(a.has("nonexistent"));
  REQUIRE_THROWS_AS(a.get("nonexistent"), pi0::Error);

  const auto dec = pi0::WeightStore::random(c, 3, 1, pi0::WeightSet::kDecoder);
  REQUIRE_FALSE(dec.has("vision_final_norm_w"));
  REQUIRE(std::memcmp(dec.get("decoder_attn_qkv_w").data, a.get("decoder_attn_qkv_w").data,
                      dec.get("decoder_attn_qkv_w").numel * 2) == 0);
}

TEST_CASE("safetensors save and load round trip", "[common]") {
  const pi0::ModelConfig c = pi0::model_config("tiny");
  const auto store = pi0::WeightStore::random(c, 5, 9, pi0::WeightSet::kAll);
  TempFile file("roundtrip");
  const std::string bytes = save_and_read(store, file.path);
  const uint64_t header_len = header_length(bytes);
  REQUIRE(header_len % 8 == 0);
  REQUIRE(bytes.size() == 8 + header_len + store.total_bytes());

  for (auto set : {pi0::WeightSet::kAll, pi0::WeightSet::kEncoder, pi0::WeightSet::kDecoder}) {
    const auto loaded = pi0::WeightStore::load_safetensors(file.path, c, set);
    REQUIRE(loaded.prompt_len() == (set == pi0::WeightSet::kDecoder ? 0 : 5));
    REQUIRE(loaded.tensors().size() == pi0::weight_specs(c, 5, set).size());
    require_tensors_of(loaded, store);
  }

  // An empty prompt round-trips too.
  const auto no_prompt = pi0::WeightStore::random(c, 0, 9, pi0::WeightSet::kEncoder);
  TempFile empty("noprompt");
  no_prompt.save_safetensors(empty.path);
  const auto loaded = pi0::WeightStore::load_safetensors(empty.path, c, pi0::WeightSet::kEncoder);
  REQUIRE(loaded.prompt_len() == 0);
  REQUIRE(loaded.get("language_embeds").numel == 0);
}

// Saved over the file it was loaded from, a store keeps its tensors, and a reader of the old file
// reads it whole (the saver renames a new file over it instead of writing in place). And
// `cp new.safetensors weights.safetensors` truncates the file in place and rewrites it: a store
// that mapped its file then gave wrong data, or SIGBUS wherever it read a lost page (the CPU
// backend reads its weights every frame); a store holds its own copy.
TEST_CASE("a loaded store keeps its tensors when its file is replaced or overwritten", "[common]") {
  const pi0::ModelConfig c = pi0::model_config("tiny");
  const auto store = pi0::WeightStore::random(c, 3, 4, pi0::WeightSet::kAll);
  TempFile file("resave");
  store.save_safetensors(file.path);
  const auto loaded = pi0::WeightStore::load_safetensors(file.path, c, pi0::WeightSet::kAll);
  const auto reader = pi0::WeightStore::load_safetensors(file.path, c, pi0::WeightSet::kDecoder);
  loaded.save_safetensors(file.path);
  const auto again = pi0::WeightStore::load_safetensors(file.path, c, pi0::WeightSet::kAll);
  require_tensors_of(again, store);
  require_tensors_of(reader, store);
  // Nothing is left beside it.
  for (const auto& entry : fs::directory_iterator(fs::path(file.path).parent_path())) {
    const std::string name = entry.path().string();
    REQUIRE((name.find("resave") == std::string::npos || name == file.path));
  }
  write_bytes(file.path, "cut");
  require_tensors_of(again, store);
  require_tensors_of(loaded, store);
}

// A rewrite in place that keeps the size moves the modification time: a load that spans one
// fails rather than return tensors of two versions. Here another thread sets a new time without
// touching the bytes, over and over, so some loads span a change and the rest load whole.
TEST_CASE("a load during which the file is modified fails with one line", "[common]") {
  const pi0::ModelConfig c = pi0::model_config("tiny");
  const auto store = pi0::WeightStore::random(c, 0, 8, pi0::WeightSet::kAll);
  TempFile file("touched");
  store.save_safetensors(file.path);
  std::atomic<bool> done{false};
  std::thread toucher([&] {
    for (long n = 1; !done.load(); ++n) {
      const timespec times[2] = {{0, UTIME_OMIT},
                                 {1'000'000 + n / 1'000'000'000, n % 1'000'000'000}};
      ::utimensat(AT_FDCWD, file.path.c_str(), times, 0);
    }
  });
  int changed = 0, whole = 0;
  std::string other;
  for (int i = 0; i < 2000 && changed < 5; ++i) {
    try {
      const auto loaded = pi0::WeightStore::load_safetensors(file.path, c, pi0::WeightSet::kAll);
      require_tensors_of(loaded, store);
      ++whole;
    } catch (const pi0::Error& e) {
      const std::string msg = e.what();
      if (contains(msg, "the file changed while it was read") &&
          msg.find('\n') == std::string::npos)
        ++changed;
      else
        other = msg;
    }
  }
  done = true;
  toucher.join();
  INFO(whole << " loads whole, " << changed << " refused");
  REQUIRE(other.empty());
  REQUIRE(changed > 0);
}

TEST_CASE("checking a weights file reads no data and finds what loading finds", "[common]") {
  const pi0::ModelConfig c = pi0::model_config("tiny");
  const auto store = pi0::WeightStore::random(c, 5, 2, pi0::WeightSet::kAll);
  TempFile file("check");
  store.save_safetensors(file.path);
  REQUIRE(pi0::WeightStore::check_safetensors(file.path, c) == 5);
  const auto check_error = [&] {
    try {
      (void)pi0::WeightStore::check_safetensors(file.path, c);
    } catch (const pi0::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  // Data that is not read can be anything: the check passes a file whose bytes were changed.
  std::string bytes = read_bytes(file.path);
  bytes[bytes.size() - 3] ^= 0x5a;
  write_bytes(file.path, bytes);
  REQUIRE(check_error().empty());
  write_edited(file.path, store, [](std::vector<Entry>& e) {
    find_entry(e, "decoder_attn_o_w").shape = "[2,48,64]";
  });
  REQUIRE(contains(check_error(), "tensor decoder_attn_o_w has shape [2,48,64]"));
  REQUIRE(check_error() == load_error(file.path, c));
  write_bytes(file.path, bytes.substr(0, bytes.size() - 1));
  REQUIRE(contains(check_error(), "truncated"));
  REQUIRE(check_error() == load_error(file.path, c));
}

TEST_CASE("loading the decoder set needs no vision tensors", "[common]") {
  const pi0::ModelConfig c = pi0::model_config("tiny");
  const auto dec = pi0::WeightStore::random(c, 0, 4, pi0::WeightSet::kDecoder);
  TempFile file("decoder");
  dec.save_safetensors(file.path);
  const auto loaded = pi0::WeightStore::load_safetensors(file.path, c, pi0::WeightSet::kDecoder);
  REQUIRE(loaded.total_bytes() == dec.total_bytes());
  const std::string msg = load_error(file.path, c, pi0::WeightSet::kEncoder);
  REQUIRE(contains(msg, "vision_patch_embedding_w"));
  REQUIRE(contains(msg, "missing"));
}

TEST_CASE("loading a missing or truncated file fails clearly", "[common]") {
  const pi0::ModelConfig c = pi0::model_config("tiny");
  SECTION("missing file") {
    const std::string msg = load_error("/nonexistent/dir/weights.safetensors", c);
    REQUIRE(contains(msg, "/nonexistent/dir/weights.safetensors"));
    REQUIRE(contains(msg, "cannot open"));
  }
  SECTION("truncated file") {
    const auto store = pi0::WeightStore::random(c, 0, 3, pi0::WeightSet::kAll);
    TempFile full("full");
    const std::string bytes = save_and_read(store, full.path);
    const uint64_t header_len = header_length(bytes);
    TempFile cut("cut");
    // Inside the length field, inside the header, inside the data, one byte short.
    for (size_t at : {size_t{0}, size_t{5}, size_t{8 + header_len / 2},
                      size_t{8 + header_len + 100}, bytes.size() - 1}) {
      write_bytes(cut.path, bytes.substr(0, at));
      const std::string msg = load_error(cut.path, c);
      INFO("cut at " << at << ": " << msg);
      REQUIRE(contains(msg, cut.path));
      REQUIRE(contains(msg, "truncated"));
      REQUIRE(msg.find('\n') == std::string::npos);
    }
  }
  SECTION("header not JSON") {
    TempFile file("notjson");
    write_bytes(file.path, std::string("\x08\0\0\0\0\0\0\0", 8) + "hello!!!");
    REQUIRE(contains(load_error(file.path, c), "not valid JSON"));
    write_bytes(file.path, std::string("\x08\0\0\0\0\0\0\0", 8) + "[1,2]   ");
    REQUIRE(contains(load_error(file.path, c), "not a JSON object"));
  }
}

TEST_CASE("loading a file with wrong tensors fails clearly", "[common]") {
  const pi0::ModelConfig c = pi0::model_config("tiny");
  const auto store = pi0::WeightStore::random(c, 2, 3, pi0::WeightSet::kAll);
  TempFile file("bad");
  SECTION("wrong shape from another config") {
    pi0::ModelConfig wider = c;
    wider.name = "tiny-wider-mlp";
    wider.lm_mlp = 256;
    pi0::WeightStore::random(wider, 2, 3, pi0::WeightSet::kAll).save_safetensors(file.path);
    const std::string msg = load_error(file.path, c);
    REQUIRE(contains(
        msg,
        "tensor encoder_ffn_gate_w has shape [2,64,256], expected [2,64,128] for model 'tiny'"));
  }
  SECTION("one tensor reshaped") {
    write_edited(file.path, store, [](std::vector<Entry>& e) {
      find_entry(e, "decoder_attn_o_w").shape = "[2,48,64]";
    });
    const std::string msg = load_error(file.path, c);
    REQUIRE(contains(msg, "decoder_attn_o_w"));
    REQUIRE(contains(msg, "expected [2,64,48]"));
  }
  SECTION("language embeds of the wrong width") {
    write_edited(file.path, store,
                 [](std::vector<Entry>& e) { find_entry(e, "language_embeds").shape = "[4,32]"; });
    REQUIRE(contains(load_error(file.path, c), "language_embeds has shape [4,32]"));
  }
  SECTION("wrong dtype") {
    write_edited(file.path, store,
                 [](std::vector<Entry>& e) { find_entry(e, "vision_attn_o_b").dtype = "F16"; });
    REQUIRE(contains(load_error(file.path, c),
                     "tensor vision_attn_o_b has dtype \"F16\", expected BF16"));
  }
  SECTION("missing tensor") {
    write_edited(file.path, store,
                 [](std::vector<Entry>& e) { find_entry(e, "encoder_ffn_up_w").include = false; });
    REQUIRE(contains(load_error(file.path, c), "tensor encoder_ffn_up_w is missing"));
    // The decoder does not need it (a file of its tensors alone loads: the case above), but here
    // its bytes are still in the data section, named by no entry: a malformed file.
    REQUIRE(contains(load_error(file.path, c, pi0::WeightSet::kDecoder), "unused"));
  }
  SECTION("offsets out of range") {
    write_edited(file.path, store, [&](std::vector<Entry>& e) {
      find_entry(e, "vision_final_norm_b").offsets =
          std::string("[")
              .append(std::to_string(store.total_bytes() - 10))
              .append(",")
              .append(std::to_string(store.total_bytes() + 86))
              .append("]");
    });
    const std::string msg = load_error(file.path, c);
    REQUIRE(contains(msg, "vision_final_norm_b"));
    REQUIRE(contains(msg, "past the end of the data"));
  }
  SECTION("offsets reversed") {
    write_edited(file.path, store, [](std::vector<Entry>& e) {
      find_entry(e, "vision_final_norm_b").offsets = "[200,104]";
    });
    REQUIRE(contains(load_error(file.path, c), "begin after end"));
  }
  SECTION("offsets of the wrong size") {
    write_edited(file.path, store, [](std::vector<Entry>& e) {
      find_entry(e, "vision_final_norm_b").offsets = "[0,90]";
    });
    REQUIRE(contains(load_error(file.path, c), "holds 90 bytes, expected 96"));
  }
  SECTION("malformed offsets") {
    write_edited(file.path, store, [](std::vector<Entry>& e) {
      find_entry(e, "vision_final_norm_b").offsets = "[0]";
    });
    REQUIRE(contains(load_error(file.path, c), "data_offsets is not [begin, end]"));
  }
  // The spec: load exactly these tensors, reject anything else.
  SECTION("extra tensors are rejected") {
    write_edited(file.path, store, [](std::vector<Entry>& e) {
      Entry extra = e.front();
      extra.name = "some_other_tensor";
      extra.dtype = "F32";
      e.push_back(extra);
    });
    REQUIRE(contains(load_error(file.path, c),
                     "\"some_other_tensor\" is not a tensor of model 'tiny'"));
  }
  // JSON keeps the last of two equal names: which entry was meant is unknowable.
  SECTION("a tensor named twice") {
    write_edited(file.path, store,
                 [](std::vector<Entry>& e) { e.push_back(find_entry(e, "vision_final_norm_b")); });
    REQUIRE(contains(load_error(file.path, c), "tensor \"vision_final_norm_b\" is named twice"));
  }
  SECTION("a field of one entry given twice") {
    write_edited(file.path, store, [](std::vector<Entry>& e) {
      find_entry(e, "vision_final_norm_b").dtype = "F32\",\"dtype\":\"BF16";  // the last wins
    });
    REQUIRE(contains(load_error(file.path, c),
                     "tensor \"vision_final_norm_b\" has its field \"dtype\" twice"));
  }
  // Names and values from the file reach the error line escaped: no line break, no terminal code.
  SECTION("a name with control characters") {
    write_edited(file.path, store, [](std::vector<Entry>& e) {
      Entry extra = e.front();
      extra.name = "evil\\nline two\\u001b[31mRED";
      e.push_back(extra);
    });
    const std::string msg = load_error(file.path, c);
    INFO(msg);
    CHECK(contains(msg, "\"evil\\nline two\\u001b[31mRED\" is not a tensor"));
    CHECK(msg.find('\n') == std::string::npos);
    CHECK(msg.find('\x1b') == std::string::npos);
  }
  SECTION("a header nested deeper than safetensors nests") {
    write_edited(file.path, store, [](std::vector<Entry>& e) {
      find_entry(e, "vision_final_norm_b").shape = std::string(40, '[') + std::string(40, ']');
    });
    REQUIRE(contains(load_error(file.path, c), "header nests deeper than a safetensors header"));
  }
  SECTION("two tensors over the same bytes") {
    write_edited(file.path, store, [](std::vector<Entry>& e) {
      find_entry(e, "vision_final_norm_b").offsets = find_entry(e, "vision_final_norm_w").offsets;
    });
    const std::string msg = load_error(file.path, c);
    INFO(msg);
    REQUIRE((contains(msg, "overlap") || contains(msg, "unused")));
  }
  SECTION("bytes after the last tensor") {
    write_edited(file.path, store, [](std::vector<Entry>&) {});
    write_bytes(file.path, read_bytes(file.path) + std::string(1000, '\x7f'));
    REQUIRE(contains(load_error(file.path, c), "1000 bytes after the last tensor"));
  }
  SECTION("a dimension written as a decimal") {
    write_edited(file.path, store, [](std::vector<Entry>& e) {
      std::string& shape = find_entry(e, "vision_final_norm_b").shape;
      shape.insert(shape.size() - 1, ".0");  // [48] -> [48.0]
    });
    REQUIRE(contains(load_error(file.path, c), "[48.0]\" is not a list of sizes"));
  }
  SECTION("a prompt longer than a run takes") {
    write_edited(file.path, store, [](std::vector<Entry>& e) {
      std::string& shape = find_entry(e, "language_embeds").shape;  // [2,W] -> [5000,W]
      shape = "[5000" + shape.substr(shape.find(','));
    });
    REQUIRE(contains(load_error(file.path, c), "language_embeds has 5000 rows"));
  }
  SECTION("a dimension past int64 is printed as written") {
    write_edited(file.path, store, [](std::vector<Entry>& e) {
      find_entry(e, "vision_final_norm_b").shape = "[18446744073709551615]";
    });
    REQUIRE(contains(load_error(file.path, c), "[18446744073709551615]\" is not a list of sizes"));
  }
  SECTION("a tensor outside the set loaded whose range lies past the data") {
    // Loading the decoder's tensors only, an encoder entry is checked for its place alone: it
    // must still be a range of the data section (here: begin after end, then past the end).
    for (const std::string bad : {"[100,0]", "[0,18446744073709551615]"}) {
      write_edited(file.path, store, [&](std::vector<Entry>& e) {
        find_entry(e, "vision_final_norm_b").offsets = bad;
      });
      const std::string msg = load_error(file.path, c, pi0::WeightSet::kDecoder);
      INFO(bad << ": " << msg);
      REQUIRE(contains(msg, "vision_final_norm_b data_offsets " + bad));
      REQUIRE(contains(msg, "are not a range of the"));
    }
  }
  SECTION("a prompt length past int64") {
    write_edited(file.path, store, [](std::vector<Entry>& e) {
      std::string& shape = find_entry(e, "language_embeds").shape;
      shape = "[18446744073709551615" + shape.substr(shape.find(','));
    });
    REQUIRE(contains(load_error(file.path, c), "language_embeds has 18446744073709551615 rows"));
  }
}

TEST_CASE("weights files that are not what they seem fail without hanging or exhausting memory",
          "[common]") {
  const pi0::ModelConfig c = pi0::model_config("tiny");
  SECTION("a FIFO") {
    // Opened for reading, a FIFO blocks until a writer comes: the load must refuse it first.
    TempFile fifo("fifo");
    REQUIRE(::mkfifo(fifo.path.c_str(), 0600) == 0);
    REQUIRE(contains(load_error(fifo.path, c), "not a regular file"));
  }
  SECTION("a header over the 16 MiB this loader reads") {
    // A sparse file: the length field, then 16 MiB of nothing the loader must not parse.
    TempFile file("hugeheader");
    const uint64_t header_len = (16 << 20) + 1;
    write_bytes(file.path, length_prefix(header_len));
    fs::resize_file(file.path, 8 + header_len);
    REQUIRE(contains(load_error(file.path, c), "over the 16777216 bytes this loader reads"));
  }
  SECTION("metadata that is not a map of names to strings, or a byte-order mark") {
    const auto store = pi0::WeightStore::random(c, 0, 3, pi0::WeightSet::kAll);
    TempFile file("metadata");
    const SavedParts saved = save_parts(store, file.path);
    const std::string& header = saved.header;
    // The saved header starts with '{': these put something before its first entry.
    const auto with_header = [&](const std::string& text) {
      return load_error_with_header(saved, text, c);
    };
    REQUIRE(with_header("{\"__metadata__\":{\"format\":\"pt\"}," + header.substr(1)).empty());
    for (const std::string metadata : {"[1,2]", "{\"format\":[\"pt\"]}", "{\"n\":3}", "\"pt\""}) {
      INFO(metadata);
      REQUIRE(contains(with_header("{\"__metadata__\":" + metadata + "," + header.substr(1)),
                       "__metadata__ is not a map of names to strings"));
    }
    REQUIRE(contains(with_header("\xEF\xBB\xBF" + header), "byte-order mark"));
  }
  SECTION("a header whose JSON is followed by a NUL byte") {
    // The JSON parser stops at a NUL: what came after it was never read, and the file loaded.
    const auto store = pi0::WeightStore::random(c, 0, 3, pi0::WeightSet::kAll);
    TempFile file("nul");
    const SavedParts saved = save_parts(store, file.path);
    for (const std::string& after : {std::string(8, '\0'), std::string("\0{\"not\": json", 13)}) {
      const std::string msg = load_error_with_header(saved, saved.header + after, c);
      INFO(msg);
      REQUIRE(
          contains(msg, "header has a NUL byte at offset " + std::to_string(saved.header.size())));
    }
  }
  SECTION("a header that is a deep run of brackets") {
    // 20 MB of '[': parsed to the end, it would take gigabytes; refused at the fourth level.
    TempFile file("deepheader");
    const std::string header = "{\"vision_final_norm_b\":" + std::string(10'000'000, '[');
    write_bytes(file.path, length_prefix(header.size()) + header);
    REQUIRE(contains(load_error(file.path, c), "header nests deeper than a safetensors header"));
  }
  SECTION("a header of many object members") {
    // Parsed whole, 100k members of {} took 73 s (the parser walks the parent at every closing
    // brace): refused at the first name the model has not, or the first object inside an entry.
    for (const std::string prefix : {"", "\"__metadata__\":{", "\"vision_final_norm_b\":{"}) {
      TempFile file("manyobjects");
      std::string header = "{" + prefix;
      for (int i = 0; i < 100'000; ++i) header += (i ? ",\"" : "\"") + std::to_string(i) + "\":{}";
      header += prefix.empty() ? "}" : "}}";
      write_bytes(file.path, length_prefix(header.size()) + header);
      const std::string msg = load_error(file.path, c);
      INFO(prefix << ": " << msg);
      REQUIRE(contains(msg, prefix.empty() ? "\"0\" is not a tensor of model 'tiny'"
                                           : "holds an object, which no field of one is"));
    }
  }
}

#ifdef PI0_TEST_HAVE_OMP
TEST_CASE("random weights do not depend on the thread count", "[common]") {
  // A wider MLP than tiny's so that the largest tensors span several generation chunks.
  pi0::ModelConfig c = pi0::model_config("tiny");
  c.lm_mlp = 1024;
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto one = pi0::WeightStore::random(c, 2, 6, pi0::WeightSet::kEncoder);
  omp_set_num_threads(3);
  const auto three = pi0::WeightStore::random(c, 2, 6, pi0::WeightSet::kEncoder);
  omp_set_num_threads(threads);
  REQUIRE(one.get("encoder_ffn_gate_w").numel >= (size_t{1} << 17));
  require_tensors_of(one, three);
  // Element i is counter normal i of the tensor's stream, whatever chunk it falls in.
  const pi0::TensorView& gate = one.get("encoder_ffn_gate_w");
  for (size_t i : {size_t{0}, size_t{65535}, size_t{65536}, gate.numel - 1}) {
    const float want = pi0::counter_normal(6, pi0::stream_id("encoder_ffn_gate_w"), i) / 8.0f;
    REQUIRE(gate.data[i].bits == pi0::float_to_bf16(want).bits);
  }
}
#endif
