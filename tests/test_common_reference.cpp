// The fp32 CPU reference of pi0 on the tiny config: determinism and the structure of the model
// (per-view vision, the prefix cache, the decoder's attention mask).
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#if __has_include(<omp.h>)
#include <omp.h>
#define PI0_TEST_HAVE_OMP 1
#endif

#include "catch.hpp"
#include "pi0/check.hpp"
#include "pi0/frame_inputs.hpp"
#include "pi0/random.hpp"
#include "pi0/reference.hpp"

namespace {

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

bool rows_equal(const std::vector<float>& a, const std::vector<float>& b, size_t first_row,
                size_t rows, size_t width) {
  return std::memcmp(a.data() + first_row * width, b.data() + first_row * width,
                     rows * width * sizeof(float)) == 0;
}

bool all_finite(const std::vector<float>& v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0.0, n = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    d += (a[i] - b[i]) * static_cast<double>(a[i] - b[i]);
    n += a[i] * static_cast<double>(a[i]);
  }
  return std::sqrt(d / n);
}

// The tiny model with both workers' weights and one frame of inputs.
struct Fixture {
  pi0::ModelConfig c = pi0::model_config("tiny");
  pi0::RunShape shape;
  pi0::WeightStore weights;
  pi0::ReferenceEncoder encoder;
  pi0::ReferenceDecoder decoder;
  pi0::FrameInputs in;

  explicit Fixture(int prompt_len = 0)
      : shape{2, 6, prompt_len},
        weights(pi0::WeightStore::random(c, prompt_len, 2024, pi0::WeightSet::kAll)),
        encoder(c, weights),
        decoder(c, weights),
        in(pi0::make_frame_inputs(c, shape, 5, 0)) {}

  std::vector<float> encode(const std::vector<pi0::Bf16>& images) const {
    std::vector<float> kv(pi0::stage_sizes(c, shape).kv_values);
    encoder.encode(shape, images.data(), kv.data());
    return kv;
  }
  std::vector<float> decode(const std::vector<float>& kv, const std::vector<pi0::Bf16>& state,
                            const std::vector<pi0::Bf16>& noise) const {
    std::vector<float> out(pi0::stage_sizes(c, shape).action_values);
    decoder.decode(shape, kv.data(), state.data(), noise.data(), out.data());
    return out;
  }
  std::vector<float> run() const { return decode(encode(in.images), in.state, in.noise); }
};

}  // namespace

TEST_CASE("reference model is deterministic for any thread count", "[common]") {
  const Fixture f;
  const auto kv = f.encode(f.in.images);
  const auto out = f.decode(kv, f.in.state, f.in.noise);
  REQUIRE(all_finite(kv));
  REQUIRE(all_finite(out));
  REQUIRE(same_bits(kv, f.encode(f.in.images)));
  REQUIRE(same_bits(out, f.decode(kv, f.in.state, f.in.noise)));
#ifdef PI0_TEST_HAVE_OMP
  const int threads = omp_get_max_threads();
  for (int n : {1, 2, 3}) {
    omp_set_num_threads(n);
    INFO("threads " << n);
    CHECK(same_bits(kv, f.encode(f.in.images)));
    CHECK(same_bits(out, f.decode(kv, f.in.state, f.in.noise)));
  }
  omp_set_num_threads(threads);
#endif
  // The output is a denoised chunk, not the noise handed in.
  std::vector<float> noise(f.in.noise.size());
  for (size_t i = 0; i < noise.size(); ++i) noise[i] = pi0::bf16_to_float(f.in.noise[i]);
  REQUIRE(rel_diff(out, noise) > 0.01);
}

TEST_CASE("vision attends within each view only", "[common]") {
  const Fixture f;
  const size_t tokens = f.c.tokens_per_view(), width = f.c.lm_width;
  std::vector<float> base(2 * tokens * width), changed(base.size());
  f.encoder.vision_tokens(2, f.in.images.data(), base.data());
  auto images = f.in.images;
  // One pixel of view 1 (the last one of the frame).
  images.back() = pi0::float_to_bf16(-pi0::bf16_to_float(images.back()) + 0.5f);
  f.encoder.vision_tokens(2, images.data(), changed.data());
  REQUIRE(rows_equal(base, changed, 0, tokens, width));
  REQUIRE_FALSE(rows_equal(base, changed, tokens, tokens, width));
  // Every token of view 1 sees the change through attention, not only the patch holding it.
  for (size_t t = tokens; t < 2 * tokens; ++t)
    REQUIRE_FALSE(rows_equal(base, changed, t, 1, width));

  // View 0 alone gives the same rows as view 0 of a two-view batch.
  std::vector<float> single(tokens * width);
  f.encoder.vision_tokens(1, f.in.images.data(), single.data());
  REQUIRE(std::memcmp(single.data(), base.data(), single.size() * sizeof(float)) == 0);
}

TEST_CASE("prefix cache depends on the images", "[common]") {
  const Fixture f;
  const auto kv = f.encode(f.in.images);
  auto images = f.in.images;
  images[0] = pi0::float_to_bf16(pi0::bf16_to_float(images[0]) + 0.5f);
  const auto kv2 = f.encode(images);
  // Attention over the whole prefix spreads the change to every layer's K and V, all rows.
  const int e = f.shape.prefix_len(f.c), hd = f.c.head_dim;
  for (int l = 0; l < f.c.lm_layers; ++l)
    for (int which = 0; which < 2; ++which) {
      const size_t at = pi0::kv_offset(f.c, e, l, which);
      REQUIRE(std::memcmp(kv.data() + at, kv2.data() + at, sizeof(float) * e * hd) != 0);
    }
  // Layer 1 sees layer 0's attention: the last row (view 1) changed although only view 0's pixel
  // did.
  const size_t last_row = pi0::kv_offset(f.c, e, 1, 0) + static_cast<size_t>(e - 1) * hd;
  REQUIRE(std::memcmp(kv.data() + last_row, kv2.data() + last_row, sizeof(float) * hd) != 0);
}

TEST_CASE("state token does not see the action tokens", "[common]") {
  const Fixture f;
  const auto kv = f.encode(f.in.images);
  const int chunk = f.shape.chunk, ad = f.c.action_dim;
  const size_t aw = f.c.action_width;
  std::vector<float> sample(static_cast<size_t>(chunk) * ad);
  for (size_t i = 0; i < sample.size(); ++i) sample[i] = pi0::bf16_to_float(f.in.noise[i]);
  auto other = sample;
  for (int i = 0; i < ad; ++i)
    other[static_cast<size_t>(chunk - 1) * ad + i] += 1.0f;  // last action row

  for (int step : {0, f.c.flow_steps - 1}) {
    std::vector<float> h1((chunk + 1) * aw), h2(h1.size());
    f.decoder.step_hidden(f.shape, kv.data(), f.in.state.data(), sample.data(), step, h1.data());
    f.decoder.step_hidden(f.shape, kv.data(), f.in.state.data(), other.data(), step, h2.data());
    REQUIRE(all_finite(h1));
    REQUIRE(rows_equal(h1, h2, 0, 1, aw));
    // Action tokens attend to each other: all of them see the change.
    for (int t = 1; t <= chunk; ++t) REQUIRE_FALSE(rows_equal(h1, h2, t, 1, aw));
  }

  // The state token does see the prefix and the state.
  std::vector<float> h1((chunk + 1) * aw), h2(h1.size()), h3(h1.size());
  f.decoder.step_hidden(f.shape, kv.data(), f.in.state.data(), sample.data(), 0, h1.data());
  auto kv2 = kv;
  kv2[pi0::kv_offset(f.c, f.shape.prefix_len(f.c), 0, 1)] += 1.0f;  // a value of layer 0's prefix
  f.decoder.step_hidden(f.shape, kv2.data(), f.in.state.data(), sample.data(), 0, h2.data());
  REQUIRE_FALSE(rows_equal(h1, h2, 0, 1, aw));
  auto state = f.in.state;
  state[0] = pi0::float_to_bf16(pi0::bf16_to_float(state[0]) + 1.0f);
  f.decoder.step_hidden(f.shape, kv.data(), state.data(), sample.data(), 0, h3.data());
  REQUIRE_FALSE(rows_equal(h1, h3, 0, 1, aw));
  // Steps differ by their time bias.
  f.decoder.step_hidden(f.shape, kv.data(), f.in.state.data(), sample.data(), 1, h2.data());
  REQUIRE_FALSE(rows_equal(h1, h2, 1, 1, aw));
  REQUIRE_THROWS_AS(f.decoder.step_hidden(f.shape, kv.data(), f.in.state.data(), sample.data(),
                                          f.c.flow_steps, h2.data()),
                    pi0::Error);
}

TEST_CASE("output changes with images state and noise", "[common]") {
  const Fixture f;
  const auto kv = f.encode(f.in.images);
  const auto out = f.decode(kv, f.in.state, f.in.noise);
  const pi0::FrameInputs other = pi0::make_frame_inputs(f.c, f.shape, 5, 1);
  const auto by_images = f.decode(f.encode(other.images), f.in.state, f.in.noise);
  const auto by_state = f.decode(kv, other.state, f.in.noise);
  const auto by_noise = f.decode(kv, f.in.state, other.noise);
  for (const auto* v : {&by_images, &by_state, &by_noise}) {
    REQUIRE(all_finite(*v));
    REQUIRE(rel_diff(*v, out) > 1e-4);
  }
}

TEST_CASE("prompt tokens extend the prefix", "[common]") {
  const Fixture f(3);
  const int e = f.shape.prefix_len(f.c), hd = f.c.head_dim;
  const int vision_rows = f.c.tokens_per_view() * 2;
  REQUIRE(e == vision_rows + 3);
  REQUIRE(f.encoder.prompt_len() == 3);
  const auto kv = f.encode(f.in.images);
  REQUIRE(kv.size() == static_cast<size_t>(f.c.lm_layers) * 2 * e * hd);
  REQUIRE(all_finite(kv));

  // The same weights with other language_embeds: rewrite those bytes in a saved file.
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("pi0_test_reference_" + std::to_string(::getpid()) + ".safetensors"))
                               .string();
  f.weights.save_safetensors(path);
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  const pi0::TensorView& lang = f.weights.get("language_embeds");
  const std::string old_bytes(reinterpret_cast<const char*>(lang.data), lang.numel * 2);
  const size_t at = bytes.find(old_bytes);
  REQUIRE(at != std::string::npos);
  for (size_t i = 0; i < lang.numel; ++i) {
    const pi0::Bf16 v = pi0::float_to_bf16(pi0::counter_normal(99, 1, i));
    std::memcpy(&bytes[at + 2 * i], &v, 2);
  }
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  std::vector<float> kv2(kv.size());
  {
    const auto other = pi0::WeightStore::load_safetensors(path, f.c, pi0::WeightSet::kEncoder);
    std::filesystem::remove(path);
    const pi0::ReferenceEncoder encoder(f.c, other);
    encoder.encode(f.shape, f.in.images.data(), kv2.data());
  }
  // Layer 0's K rows are row-wise functions of their own token: vision rows stay, prompt rows move.
  const size_t k0 = pi0::kv_offset(f.c, e, 0, 0);
  REQUIRE(std::memcmp(kv.data() + k0, kv2.data() + k0, sizeof(float) * vision_rows * hd) == 0);
  for (int r = vision_rows; r < e; ++r)
    REQUIRE(std::memcmp(kv.data() + k0 + r * hd, kv2.data() + k0 + r * hd, sizeof(float) * hd) !=
            0);
  // From layer 1 on, attention over the whole prefix lets the prompt reach the vision rows.
  const size_t k1 = pi0::kv_offset(f.c, e, 1, 0);
  REQUIRE(std::memcmp(kv.data() + k1, kv2.data() + k1, sizeof(float) * hd) != 0);

  // A prompt length that does not match the weights is refused.
  pi0::RunShape wrong = f.shape;
  wrong.prompt_len = 2;
  std::vector<float> kv_wrong(pi0::stage_sizes(f.c, wrong).kv_values);
  REQUIRE_THROWS_AS(f.encoder.encode(wrong, f.in.images.data(), kv_wrong.data()), pi0::Error);
}
