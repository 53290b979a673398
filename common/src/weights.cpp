#include "pi0/weights.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <tuple>
#include <utility>
#include <vector>

#include "pi0/check.hpp"
#include "pi0/random.hpp"

namespace pi0 {
namespace {

constexpr float kSmallInitStd = 0.02f;  // position embedding and time biases
constexpr size_t kGenerateChunk = size_t{1} << 16;

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ',';
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

// One spec row. Matrices take fan_in from their input (second-to-last) dimension.
TensorSpec matrix(std::string name, std::vector<int64_t> shape) {
  const int64_t fan_in = shape[shape.size() - 2];
  return {std::move(name), std::move(shape), fan_in,
          static_cast<float>(1.0 / std::sqrt(static_cast<double>(fan_in))), false};
}
TensorSpec bias(std::string name, std::vector<int64_t> shape) {
  return {std::move(name), std::move(shape), 0, 0.0f, false};
}
TensorSpec norm_weight(std::string name, std::vector<int64_t> shape) {
  return {std::move(name), std::move(shape), 0, 0.0f, true};
}
TensorSpec normal(std::string name, std::vector<int64_t> shape, float std) {
  return {std::move(name), std::move(shape), 0, std, false};
}

bool in_set(const std::string& name, WeightSet set) {
  if (set == WeightSet::kAll) return true;
  const bool decoder = name.rfind("decoder_", 0) == 0;
  return set == WeightSet::kDecoder ? decoder : !decoder;
}

class FileError {
 public:
  explicit FileError(std::string path) : path_(std::move(path)) {}
  [[noreturn]] void fail(const std::string& problem) const {
    throw Error("weights file '" + path_ + "': " + problem);
  }

 private:
  std::string path_;
};

}  // namespace

size_t TensorSpec::numel() const {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

std::vector<TensorSpec> weight_specs(const ModelConfig& c, int prompt_len, WeightSet set) {
  c.validate();
  PI0_CHECK(prompt_len >= 0,
            "prompt length must be non-negative, got " + std::to_string(prompt_len));
  const int64_t lv = c.vision_layers, vw = c.vision_width, vqkv = c.vision_qkv_width(),
                vmlp = c.vision_mlp;
  const int64_t ll = c.lm_layers, lw = c.lm_width, qkv = c.qkv_width(), qw = c.lm_q_width(),
                lmlp = c.lm_mlp;
  const int64_t aw = c.action_width, amlp = c.action_mlp;
  const int64_t p = c.patch_size;

  // The patch embedding is [p, p, channels, width]: its input dimension is the whole patch, not
  // the channel count the generic [.., in, out] rule would pick.
  TensorSpec patch = matrix("vision_patch_embedding_w", {p, p, c.image_channels, vw});
  patch.fan_in = c.patch_values();
  patch.init_std = static_cast<float>(1.0 / std::sqrt(static_cast<double>(patch.fan_in)));

  std::vector<TensorSpec> all = {
      patch,
      bias("vision_patch_embedding_b", {vw}),
      normal("vision_position_embedding", {c.tokens_per_view(), vw}, kSmallInitStd),
      matrix("vision_attn_qkv_w", {lv, vw, vqkv}),
      bias("vision_attn_qkv_b", {lv, vqkv}),
      matrix("vision_attn_o_w", {lv, vw, vw}),
      bias("vision_attn_o_b", {lv, vw}),
      matrix("vision_ffn_up_w", {lv, vw, vmlp}),
      bias("vision_ffn_up_b", {lv, vmlp}),
      matrix("vision_ffn_down_w", {lv, vmlp, vw}),
      bias("vision_ffn_down_b", {lv, vw}),
      norm_weight("vision_pre_attn_norm_w", {lv, vw}),
      bias("vision_pre_attn_norm_b", {lv, vw}),
      norm_weight("vision_pre_ffn_norm_w", {lv, vw}),
      bias("vision_pre_ffn_norm_b", {lv, vw}),
      norm_weight("vision_final_norm_w", {vw}),
      bias("vision_final_norm_b", {vw}),
      matrix("encoder_multi_modal_projector_w", {vw, lw}),
      bias("encoder_multi_modal_projector_b", {lw}),
      matrix("encoder_attn_qkv_w", {ll, lw, qkv}),
      matrix("encoder_attn_o_w", {ll, qw, lw}),
      matrix("encoder_ffn_gate_w", {ll, lw, lmlp}),
      matrix("encoder_ffn_up_w", {ll, lw, lmlp}),
      matrix("encoder_ffn_down_w", {ll, lmlp, lw}),
      matrix("decoder_state_in_proj_w", {c.state_dim, aw}),
      bias("decoder_state_in_proj_b", {aw}),
      matrix("decoder_action_fused_in_proj_w", {c.action_dim, aw}),
      normal("decoder_action_fused_time_biases", {c.flow_steps, aw}, kSmallInitStd),
      matrix("decoder_action_mlp_w", {aw, aw}),
      bias("decoder_action_mlp_b", {aw}),
      matrix("decoder_attn_qkv_w", {ll, aw, qkv}),
      matrix("decoder_attn_o_w", {ll, qw, aw}),
      matrix("decoder_ffn_gate_w", {ll, aw, amlp}),
      matrix("decoder_ffn_up_w", {ll, aw, amlp}),
      matrix("decoder_ffn_down_w", {ll, amlp, aw}),
      matrix("decoder_action_fused_out_proj_w", {aw, c.action_dim}),
      bias("decoder_action_fused_out_proj_b", {c.action_dim}),
      normal("language_embeds", {prompt_len, lw}, 1.0f),
  };
  std::vector<TensorSpec> out;
  for (auto& s : all)
    if (in_set(s.name, set)) out.push_back(std::move(s));
  return out;
}

struct WeightStore::Backing {
  // Inner vectors keep their data pointers when the outer vector grows, so views stay valid.
  std::vector<std::vector<Bf16>> owned;
  // A loaded file's tensors, read into one anonymous mapping.
  void* region = nullptr;
  size_t region_bytes = 0;

  Backing() = default;
  Backing(const Backing&) = delete;
  Backing& operator=(const Backing&) = delete;
  ~Backing() {
    if (region) ::munmap(region, region_bytes);
  }
};

WeightStore::WeightStore() : backing_(std::make_unique<Backing>()) {}
WeightStore::~WeightStore() = default;
WeightStore::WeightStore(WeightStore&&) noexcept = default;
WeightStore& WeightStore::operator=(WeightStore&&) noexcept = default;

WeightStore WeightStore::random(const ModelConfig& config, int prompt_len, uint64_t seed,
                                WeightSet set) {
  WeightStore store;
  store.prompt_len_ = prompt_len;
  for (const TensorSpec& spec : weight_specs(config, prompt_len, set)) {
    const size_t n = spec.numel();
    std::vector<Bf16> data(n);
    const uint64_t stream = stream_id(spec.name);
    const float std = spec.init_std;
    const Bf16 constant = float_to_bf16(spec.init_one ? 1.0f : 0.0f);
    Bf16* out = data.data();
    const bool is_random = !spec.init_one && std != 0.0f;
    const long chunks = static_cast<long>((n + kGenerateChunk - 1) / kGenerateChunk);
    // Every element is a pure function of (seed, tensor, index), so the split over threads does
    // not change the result.
#pragma omp parallel for schedule(dynamic, 4) if (chunks > 1)
    for (long ci = 0; ci < chunks; ++ci) {
      const size_t begin = static_cast<size_t>(ci) * kGenerateChunk;
      const size_t end = std::min(n, begin + kGenerateChunk);
      if (is_random) {
        for (size_t i = begin; i < end; ++i)
          out[i] = float_to_bf16(counter_normal(seed, stream, i) * std);
      } else {
        for (size_t i = begin; i < end; ++i) out[i] = constant;
      }
    }
    TensorView view{data.data(), spec.shape, n};
    store.backing_->owned.push_back(std::move(data));
    store.tensors_.emplace(spec.name, std::move(view));
  }
  return store;
}

namespace {

// A tensor's data_offsets value as [begin, end] (unchecked against the data section).
std::pair<uint64_t, uint64_t> data_range(const nlohmann::json& offsets, const std::string& name,
                                         const FileError& err) {
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned())
    err.fail("tensor " + name + " data_offsets is not [begin, end]");
  return {offsets[0].get<uint64_t>(), offsets[1].get<uint64_t>()};
}

// Text from the file, for an error line: quoted, with control characters and anything but
// printable ASCII escaped, so that a name cannot break the line or drive the terminal.
std::string escaped(const std::string& text) {
  return nlohmann::json(text).dump(-1, ' ', true, nlohmann::json::error_handler_t::replace);
}

// The names a header may hold for `config`: every tensor of the model, and the format's
// __metadata__.
std::set<std::string> model_entry_names(const ModelConfig& config) {
  std::set<std::string> names = {"__metadata__"};
  for (const TensorSpec& spec : weight_specs(config, 0, WeightSet::kAll)) names.insert(spec.name);
  return names;
}

// The spec's "load exactly these, reject anything else": the entries' data ranges tile the data
// section, with no overlap, gap or trailing bytes, and __metadata__ is what the format says.
// That every entry is one of the model's tensors (or __metadata__) was checked as the header was
// parsed (check_file's callback); the entries' own checks (dtype, shape, size) come first, per
// tensor of the set being loaded.
void check_layout(const nlohmann::json& header, const FileError& err, uint64_t data_size) {
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      // The format's metadata maps names to strings, and its readers take it as such.
      if (!entry.is_object() ||
          !std::all_of(entry.begin(), entry.end(), [](const auto& v) { return v.is_string(); }))
        err.fail("__metadata__ is not a map of names to strings");
      continue;
    }
    const auto offsets = entry.is_object() ? entry.find("data_offsets") : entry.end();
    if (offsets == entry.end()) err.fail("tensor " + name + " data_offsets is not [begin, end]");
    // Every entry, in the set being loaded or not: the ranges must tile the data section.
    const auto [begin, end] = data_range(*offsets, name, err);
    if (begin > end || end > data_size)
      err.fail("tensor " + name + " data_offsets [" + std::to_string(begin) + "," +
               std::to_string(end) + "] are not a range of the " + std::to_string(data_size) +
               "-byte data section");
    ranges.emplace_back(begin, end);
  }
  std::sort(ranges.begin(), ranges.end());
  uint64_t at = 0;
  for (const auto& [begin, end] : ranges) {
    if (begin != at)
      err.fail(begin < at ? "tensor data ranges overlap at byte " + std::to_string(begin)
                          : "tensor data leaves bytes " + std::to_string(at) + ".." +
                                std::to_string(begin) + " unused");
    at = end;
  }
  if (at != data_size)
    err.fail("the data section has " + std::to_string(data_size - std::min(at, data_size)) +
             " bytes after the last tensor");
}

// An open file, closed when this goes.
class FileHandle {
 public:
  explicit FileHandle(int fd) : fd_(fd) {}
  FileHandle(const FileHandle&) = delete;
  FileHandle& operator=(const FileHandle&) = delete;
  ~FileHandle() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

// Reads `bytes` at `offset` in full. The file is read, not mapped: a file that another program
// shrinks (`cp` over it truncates it first) then fails here with one line, where a mapping would
// end the process with SIGBUS wherever the lost bytes were first touched, long after the load.
void read_exactly(int fd, void* dst, size_t bytes, uint64_t offset, const FileError& err,
                  const std::string& what) {
  auto* at = static_cast<unsigned char*>(dst);
  while (bytes > 0) {
    const ssize_t n =
        ::pread(fd, at, std::min<size_t>(bytes, size_t{1} << 30), static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) err.fail("cannot read " + what + ": " + std::strerror(errno));
    if (n == 0)
      err.fail("the file ended at byte " + std::to_string(offset) + " while reading " + what +
               ": it shrank while being read");
    at += n;
    bytes -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

// Where one tensor of the set being loaded lies in the file.
struct Placement {
  size_t spec;      // index into CheckedFile::specs
  uint64_t offset;  // from the start of the file
};

// A safetensors file whose header has passed every check for `config`: the open file, the
// prompt length, and where each tensor of the set lies. Reads no tensor data.
struct CheckedFile {
  std::unique_ptr<FileHandle> file;
  struct stat status {};  // when the header was read
  int prompt_len = 0;
  std::vector<TensorSpec> specs;
  std::vector<Placement> placements;
};

CheckedFile check_file(const std::string& path, const ModelConfig& config, WeightSet set) {
  const FileError err(path);
  CheckedFile checked;
  // O_NONBLOCK: a FIFO named as the weights would block the open until a writer came, before
  // the regular-file check below could refuse it. Cleared after it, for filesystems (FUSE) that
  // would answer a read with EAGAIN.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  const int open_errno = errno;
  checked.file = std::make_unique<FileHandle>(fd);
  if (fd < 0) err.fail(std::string("cannot open: ") + std::strerror(open_errno));
  struct stat& st = checked.status;
  if (::fstat(fd, &st) != 0) err.fail(std::string("cannot stat: ") + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) err.fail("not a regular file");
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0)
    err.fail(std::string("cannot make it blocking: ") + std::strerror(errno));
  const size_t file_size = static_cast<size_t>(st.st_size);
  if (file_size < 8)
    err.fail("file is " + std::to_string(file_size) +
             " bytes, shorter than the 8-byte header length: truncated");
  unsigned char length_bytes[8];
  read_exactly(fd, length_bytes, 8, 0, err, "the header length");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | length_bytes[i];  // little-endian
  if (header_len > file_size - 8)
    err.fail("header length " + std::to_string(header_len) + " runs past the end of the file (" +
             std::to_string(file_size) + " bytes): truncated or not a safetensors file");
  // pi0's header is ~4 KB and the format allows 100 MB; a header of 99 MB of metadata strings
  // took 10 s and 1.8 GB to parse, so this loader reads at most 16 MiB.
  constexpr uint64_t kMaxHeaderBytes = 16 << 20;
  if (header_len > kMaxHeaderBytes)
    err.fail("header length " + std::to_string(header_len) + " is over the " +
             std::to_string(kMaxHeaderBytes) + " bytes this loader reads (pi0's is ~4 KB)");
  std::string header_bytes(header_len, '\0');
  read_exactly(fd, header_bytes.data(), header_len, 8, err, "the header");
  const char* header_text = header_bytes.data();
  const uint64_t data_start = 8 + header_len;
  const size_t data_size = file_size - data_start;

  nlohmann::json header;
  // JSON lets a name repeat and the parser keeps the last: a file that names a tensor twice, or a
  // field of one entry twice, is ambiguous, and refused. And a safetensors header nests three
  // levels deep (the object, an entry, its shape): deeper is no such header, and parsing a deep
  // one (a 100 MB run of '[') would take gigabytes.
  constexpr int kMaxHeaderDepth = 3;
  struct TooDeep {};
  // Refused as they are read, not after the whole header is: a name that is not one of the
  // model's tensors, and an object inside an entry (no field of one is an object, and
  // __metadata__ maps names to strings). Otherwise a header of many such members, well under
  // the size cap, takes the parser time that grows with their square (nlohmann 3.11's callback
  // parser walks the parent at every closing brace): 100k members took 73 s.
  struct Unexpected {
    std::string what;
  };
  const std::set<std::string> known_names = model_entry_names(config);
  std::set<std::string> names, fields;
  std::string entry, repeated;
  const auto note_repeats = [&](int depth, nlohmann::json::parse_event_t event,
                                nlohmann::json& parsed) {
    using Event = nlohmann::json::parse_event_t;
    if ((event == Event::object_start || event == Event::array_start) && depth >= kMaxHeaderDepth)
      throw TooDeep{};
    if (event == Event::object_start && depth == 2)
      throw Unexpected{"entry " + escaped(entry) + " holds an object, which no field of one is"};
    if (event == Event::object_start && depth == 1) fields.clear();
    if (event != Event::key || !parsed.is_string() || !repeated.empty()) return true;
    const std::string key = parsed.get<std::string>();
    if (depth == 1) {
      entry = key;
      if (!known_names.count(key))
        throw Unexpected{"tensor " + escaped(key) + " is not a tensor of model '" + config.name +
                         "'"};
      if (!names.insert(key).second) repeated = "tensor " + escaped(key) + " is named twice";
    } else if (depth == 2 && !fields.insert(key).second) {
      repeated = "tensor " + escaped(entry) + " has its field " + escaped(key) + " twice";
    }
    return true;
  };
  // nlohmann skips a UTF-8 byte-order mark; the format's own reader (serde_json) refuses one.
  if (header_len >= 3 && std::memcmp(header_text, "\xEF\xBB\xBF", 3) == 0)
    err.fail("header starts with a UTF-8 byte-order mark, which a safetensors header may not");
  // And nlohmann ends its input at a NUL byte, so that whatever followed one went unread: a
  // header of JSON, a NUL and anything at all loaded. serde_json refuses any byte after the JSON
  // but whitespace (writers pad with spaces).
  if (const void* nul = std::memchr(header_text, '\0', header_len))
    err.fail("header has a NUL byte at offset " +
             std::to_string(static_cast<const char*>(nul) - header_text) +
             ", which a safetensors header (JSON text, padded with spaces) may not");
  try {
    header = nlohmann::json::parse(header_text, header_text + header_len, note_repeats);
  } catch (const TooDeep&) {
    err.fail("header nests deeper than a safetensors header (" + std::to_string(kMaxHeaderDepth) +
             " levels)");
  } catch (const Unexpected& e) {
    err.fail(e.what);
  } catch (const nlohmann::json::exception&) {
    err.fail("header is not valid JSON");
  } catch (const std::bad_alloc&) {
    err.fail("header is too large to parse");
  }
  if (!header.is_object()) err.fail("header is not a JSON object");
  if (!repeated.empty()) err.fail(repeated + " in the header");

  // language_embeds' first dimension is the prompt length, whatever it is.
  int prompt_len = 0;
  if (set != WeightSet::kDecoder) {
    const auto it = header.find("language_embeds");
    if (it != header.end() && it->is_object() && it->contains("shape") &&
        (*it)["shape"].is_array() && !(*it)["shape"].empty() &&
        (*it)["shape"][0].is_number_integer()) {
      const nlohmann::json& rows = (*it)["shape"][0];
      // The parser keeps every non-negative integer unsigned, so a negative one is the only
      // signed case; read as int64, 2^64 - 1 would be -1.
      const bool in_range = rows.is_number_unsigned() && rows.get<uint64_t>() <= kMaxPromptLen;
      if (!in_range)
        err.fail("tensor language_embeds has " + rows.dump() + " rows, expected a prompt of 0.." +
                 std::to_string(kMaxPromptLen) + " tokens");
      prompt_len = static_cast<int>(rows.get<uint64_t>());
    }
  }
  checked.prompt_len = prompt_len;
  checked.specs = weight_specs(config, prompt_len, set);

  for (size_t index = 0; index < checked.specs.size(); ++index) {
    const TensorSpec& spec = checked.specs[index];
    const std::string& name = spec.name;
    const auto it = header.find(name);
    if (it == header.end()) err.fail("tensor " + name + " is missing");
    const nlohmann::json& entry = *it;
    std::string dtype;
    std::vector<int64_t> shape;
    uint64_t begin = 0, end = 0;
    try {
      if (!entry.is_object()) err.fail("tensor " + name + " header entry is not an object");
      dtype = entry.at("dtype").get<std::string>();
      const auto& dims = entry.at("shape");
      // get<int64_t> would truncate 48.9 to 48, and a huge decimal has no int64 at all.
      // Unsigned and below 2^62: read as int64, 2^64 - 1 would print as -1. (Any dimension that
      // large fails the shape check below; this keeps its message true.)
      if (!dims.is_array() || !std::all_of(dims.begin(), dims.end(), [](const auto& d) {
            return d.is_number_unsigned() && d.template get<uint64_t>() < (uint64_t{1} << 62);
          }))
        err.fail("tensor " + name + " shape " + escaped(dims.dump()) + " is not a list of sizes");
      shape = dims.get<std::vector<int64_t>>();
      std::tie(begin, end) = data_range(entry.at("data_offsets"), name, err);
    } catch (const nlohmann::json::exception& e) {
      err.fail("tensor " + name + " has a malformed header entry (" + e.what() + ")");
    }
    if (dtype != "BF16")
      err.fail("tensor " + name + " has dtype " + escaped(dtype) + ", expected BF16");
    const bool shape_ok =
        name == "language_embeds"
            ? shape.size() == 2 && shape[0] == spec.shape[0] && shape[1] == spec.shape[1]
            : shape == spec.shape;
    if (!shape_ok) {
      std::string expected = shape_text(spec.shape);
      if (name == "language_embeds") expected = "[P," + std::to_string(spec.shape[1]) + "]";
      err.fail("tensor " + name + " has shape " + shape_text(shape) + ", expected " + expected +
               " for model '" + config.name + "'");
    }
    if (begin > end)
      err.fail("tensor " + name + " data_offsets [" + std::to_string(begin) + "," +
               std::to_string(end) + "] have begin after end");
    if (end > data_size)
      err.fail("tensor " + name + " data_offsets [" + std::to_string(begin) + "," +
               std::to_string(end) + "] run past the end of the data (" +
               std::to_string(data_size) + " bytes): truncated");
    const size_t numel = spec.numel();
    if (end - begin != numel * sizeof(Bf16))
      err.fail("tensor " + name + " holds " + std::to_string(end - begin) + " bytes, expected " +
               std::to_string(numel * sizeof(Bf16)) + " for shape " + shape_text(shape));
    checked.placements.push_back({index, data_start + begin});
  }
  check_layout(header, err, data_size);
  return checked;
}

}  // namespace

WeightStore WeightStore::load_safetensors(const std::string& path, const ModelConfig& config,
                                          WeightSet set) {
  const CheckedFile checked = check_file(path, config, set);
  const FileError err(path);
  WeightStore store;
  store.prompt_len_ = checked.prompt_len;
  // One region for the set's tensors, each at a 64-byte boundary, in 2 MiB pages where the kernel
  // gives them: pi0's encoder set is 4.5 GB, and vectors of it, zeroed and faulted in 4 KB at a
  // time, took longer than the reads. Read in 64 MiB pieces by all threads.
  constexpr size_t kAlign = 64, kPiece = size_t{64} << 20;
  struct Piece {
    size_t at;  // in the region
    uint64_t offset;
    size_t bytes;
    size_t placement;
  };
  std::vector<Piece> pieces;
  std::vector<size_t> starts;
  size_t total = 0;
  for (size_t i = 0; i < checked.placements.size(); ++i) {
    const size_t bytes = checked.specs[checked.placements[i].spec].numel() * sizeof(Bf16);
    starts.push_back(total);
    for (size_t done = 0; done < bytes; done += kPiece)
      pieces.push_back(
          {total + done, checked.placements[i].offset + done, std::min(kPiece, bytes - done), i});
    total += (bytes + kAlign - 1) / kAlign * kAlign;
  }
  Backing& backing = *store.backing_;
  backing.region_bytes = std::max<size_t>(total, 1);
  void* region = ::mmap(nullptr, backing.region_bytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (region == MAP_FAILED)
    err.fail("cannot allocate " + std::to_string(total) +
             " bytes for its tensors: " + std::strerror(errno));
  backing.region = region;
  (void)::madvise(region, backing.region_bytes, MADV_HUGEPAGE);  // advice only
  auto* base = static_cast<unsigned char*>(region);
  std::exception_ptr failure;
  const long piece_count = static_cast<long>(pieces.size());
#pragma omp parallel for schedule(dynamic) if (piece_count > 1)
  for (long i = 0; i < piece_count; ++i) {
    try {
      const Piece& piece = pieces[static_cast<size_t>(i)];
      const std::string& name = checked.specs[checked.placements[piece.placement].spec].name;
      read_exactly(checked.file->get(), base + piece.at, piece.bytes, piece.offset, err,
                   "tensor " + name);
    } catch (...) {  // nothing may leave the parallel region (std::terminate)
#pragma omp critical(pi0_weights_read_failure)
      if (!failure) failure = std::current_exception();
    }
  }
  if (failure) std::rethrow_exception(failure);
  // A file rewritten in place while it was read (without shrinking) would give tensors of both
  // versions. Its size or modification time tells, as far as the time's resolution goes (not
  // its change time, which a rename over the path also moves). Writers should write a new file
  // and rename it over (as save_safetensors does), which an open file never sees.
  struct stat after {};
  const struct stat& before = checked.status;
  if (::fstat(checked.file->get(), &after) != 0 || after.st_size != before.st_size ||
      after.st_mtim.tv_sec != before.st_mtim.tv_sec ||
      after.st_mtim.tv_nsec != before.st_mtim.tv_nsec)
    err.fail("the file changed while it was read (replace it by renaming a new file over it)");
  for (size_t i = 0; i < checked.placements.size(); ++i) {
    const TensorSpec& spec = checked.specs[checked.placements[i].spec];
    store.tensors_.emplace(spec.name, TensorView{reinterpret_cast<const Bf16*>(base + starts[i]),
                                                 spec.shape, spec.numel()});
  }
  return store;
}

int WeightStore::check_safetensors(const std::string& path, const ModelConfig& config) {
  return check_file(path, config, WeightSet::kAll).prompt_len;
}

void WeightStore::save_safetensors(const std::string& path) const {
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (const auto& [name, view] : tensors_) {
    const uint64_t bytes = view.numel * sizeof(Bf16);
    header[name] = {
        {"dtype", "BF16"}, {"shape", view.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  // Padding keeps the data section 8-byte aligned, as the safetensors writers do.
  text.append((8 - text.size() % 8) % 8, ' ');

  // Written beside the file and renamed over it: a process still reading `path` (a worker that
  // is loading it) keeps reading the old file whole, and a reader never sees half a file.
  const std::string partial = path + ".partial-" + std::to_string(::getpid());
  {
    std::ofstream out(partial, std::ios::binary | std::ios::trunc);
    if (!out)
      throw Error("weights file '" + path + "': cannot open " + partial +
                  " for writing: " + std::strerror(errno));
    unsigned char len[8];
    uint64_t n = text.size();
    for (int i = 0; i < 8; ++i, n >>= 8) len[i] = static_cast<unsigned char>(n & 0xff);
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const auto& [name, view] : tensors_)
      out.write(reinterpret_cast<const char*>(view.data),
                static_cast<std::streamsize>(view.numel * sizeof(Bf16)));
    out.close();
    if (!out) {
      ::unlink(partial.c_str());
      throw Error("weights file '" + path + "': write failed");
    }
  }
  if (std::rename(partial.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    ::unlink(partial.c_str());
    throw Error("weights file '" + path + "': cannot replace it: " + why);
  }
}

const TensorView& WeightStore::get(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end())
    throw Error("weights: tensor " + name + " is not loaded (" + std::to_string(tensors_.size()) +
                " tensors held)");
  return it->second;
}

bool WeightStore::has(const std::string& name) const {
  return tensors_.count(name) != 0;
}

size_t WeightStore::total_bytes() const {
  size_t total = 0;
  for (const auto& [name, view] : tensors_) total += view.numel * sizeof(Bf16);
  return total;
}

}  // namespace pi0
