// The CPU reference against a second, deliberately naive reading of the spec: double precision,
// one loop per formula, weights indexed straight from the bf16 store. It catches indexing slips
// (patch order, Q|K|V split, layer slices, K/V cache layout, RoPE positions, the decoder mask)
// that the structural tests cannot see.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "catch.hpp"
#include "pi0/frame_inputs.hpp"
#include "pi0/reference.hpp"

namespace {

using Mat = std::vector<double>;  // row-major; widths are passed alongside

class Naive {
 public:
  Naive(const pi0::ModelConfig& c, const pi0::WeightStore& w) : c_(c), w_(w) {}

  // x [rows, in] @ name[layer] [in, out] (+ bias[layer]).
  Mat linear(const Mat& x, int rows, int in, int out, const std::string& name, int layer,
             const std::string& bias = "") const {
    const pi0::Bf16* w = w_.get(name).data + static_cast<size_t>(layer) * in * out;
    const pi0::Bf16* b =
        bias.empty() ? nullptr : w_.get(bias).data + static_cast<size_t>(layer) * out;
    Mat y(static_cast<size_t>(rows) * out);
    for (int r = 0; r < rows; ++r)
      for (int o = 0; o < out; ++o) {
        double s = b ? pi0::bf16_to_float(b[o]) : 0.0;
        for (int i = 0; i < in; ++i)
          s += x[r * in + i] * pi0::bf16_to_float(w[static_cast<size_t>(i) * out + o]);
        y[r * out + o] = s;
      }
    return y;
  }
  Mat layer_norm(const Mat& x, int rows, int width, const std::string& prefix, int layer) const {
    const pi0::Bf16* g = w_.get(prefix + "_w").data + static_cast<size_t>(layer) * width;
    const pi0::Bf16* b = w_.get(prefix + "_b").data + static_cast<size_t>(layer) * width;
    Mat y(x.size());
    for (int r = 0; r < rows; ++r) {
      double mean = 0, var = 0;
      for (int i = 0; i < width; ++i) mean += x[r * width + i] / width;
      for (int i = 0; i < width; ++i) var += std::pow(x[r * width + i] - mean, 2) / width;
      for (int i = 0; i < width; ++i)
        y[r * width + i] = (x[r * width + i] - mean) / std::sqrt(var + c_.vision_norm_eps) *
                               pi0::bf16_to_float(g[i]) +
                           pi0::bf16_to_float(b[i]);
    }
    return y;
  }
  Mat rms(const Mat& x, int rows, int width) const {
    Mat y(x.size());
    for (int r = 0; r < rows; ++r) {
      double ms = 0;
      for (int i = 0; i < width; ++i) ms += x[r * width + i] * x[r * width + i] / width;
      for (int i = 0; i < width; ++i)
        y[r * width + i] = x[r * width + i] / std::sqrt(ms + c_.rms_eps);
    }
    return y;
  }
  static double gelu(double x) {
    return 0.5 * x *
           (1 + std::tanh(std::sqrt(2 / 3.14159265358979323846) * (x + 0.044715 * x * x * x)));
  }
  // Rotates head h of row r (position pos) in place; the vector starts at p.
  void rope(double* p, int pos) const {
    for (int i = 0; i < c_.head_dim / 2; ++i) {
      const double a = pos * std::pow(static_cast<double>(c_.rope_theta), -2.0 * i / c_.head_dim);
      const double x0 = p[2 * i], x1 = p[2 * i + 1];
      p[2 * i] = x0 * std::cos(a) - x1 * std::sin(a);
      p[2 * i + 1] = x0 * std::sin(a) + x1 * std::cos(a);
    }
  }
  // One head: q [dim] against keys/values given as row pointers, with a visibility list.
  static void attend(const double* q, const std::vector<const double*>& k,
                     const std::vector<const double*>& v, int dim, double* out) {
    std::vector<double> p(k.size());
    double mx = -1e300, sum = 0;
    for (size_t j = 0; j < k.size(); ++j) {
      double d = 0;
      for (int i = 0; i < dim; ++i) d += q[i] * k[j][i];
      p[j] = d / std::sqrt(static_cast<double>(dim));
      mx = std::max(mx, p[j]);
    }
    for (double& x : p) sum += (x = std::exp(x - mx));
    for (int i = 0; i < dim; ++i) {
      double s = 0;
      for (size_t j = 0; j < k.size(); ++j) s += p[j] * v[j][i];
      out[i] = s / sum;
    }
  }

  // The encoder: K/V cache [layers][2][E][head_dim].
  Mat encode(const pi0::RunShape& shape, const pi0::Bf16* images) const {
    const int ps = c_.patch_size, side = c_.patches_per_side(), T = c_.tokens_per_view();
    const int vw = c_.vision_width, pv = c_.patch_values(), rows = shape.views * T;
    Mat patches(static_cast<size_t>(rows) * pv);
    for (int v = 0; v < shape.views; ++v)
      for (int py = 0; py < side; ++py)
        for (int px = 0; px < side; ++px)
          for (int r = 0; r < ps; ++r)
            for (int col = 0; col < ps; ++col)
              for (int ch = 0; ch < c_.image_channels; ++ch) {
                const size_t pixel =
                    ((static_cast<size_t>(v) * c_.image_size + py * ps + r) * c_.image_size +
                     px * ps + col) *
                        c_.image_channels +
                    ch;
                patches[(static_cast<size_t>(v) * T + py * side + px) * pv +
                        (r * ps + col) * c_.image_channels + ch] =
                    pi0::bf16_to_float(images[pixel]);
              }
    Mat x =
        linear(patches, rows, pv, vw, "vision_patch_embedding_w", 0, "vision_patch_embedding_b");
    const pi0::Bf16* pos = w_.get("vision_position_embedding").data;
    for (int t = 0; t < rows; ++t)
      for (int i = 0; i < vw; ++i) x[t * vw + i] += pi0::bf16_to_float(pos[(t % T) * vw + i]);
    const int heads = c_.vision_heads, hd = c_.vision_head_dim, q3 = 3 * vw;
    for (int l = 0; l < c_.vision_layers; ++l) {
      const Mat h = layer_norm(x, rows, vw, "vision_pre_attn_norm", l);
      const Mat qkv = linear(h, rows, vw, q3, "vision_attn_qkv_w", l, "vision_attn_qkv_b");
      Mat attn(static_cast<size_t>(rows) * vw);
      for (int t = 0; t < rows; ++t)
        for (int hh = 0; hh < heads; ++hh) {
          std::vector<const double*> k, v;
          for (int j = t / T * T; j < (t / T + 1) * T; ++j) {
            k.push_back(&qkv[j * q3 + vw + hh * hd]);
            v.push_back(&qkv[j * q3 + 2 * vw + hh * hd]);
          }
          attend(&qkv[t * q3 + hh * hd], k, v, hd, &attn[t * vw + hh * hd]);
        }
      const Mat o = linear(attn, rows, vw, vw, "vision_attn_o_w", l, "vision_attn_o_b");
      for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
      Mat u = linear(layer_norm(x, rows, vw, "vision_pre_ffn_norm", l), rows, vw, c_.vision_mlp,
                     "vision_ffn_up_w", l, "vision_ffn_up_b");
      for (double& e : u) e = gelu(e);
      const Mat d = linear(u, rows, c_.vision_mlp, vw, "vision_ffn_down_w", l, "vision_ffn_down_b");
      for (size_t i = 0; i < x.size(); ++i) x[i] += d[i];
    }
    const int lw = c_.lm_width, E = shape.prefix_len(c_);
    Mat lm = linear(layer_norm(x, rows, vw, "vision_final_norm", 0), rows, vw, lw,
                    "encoder_multi_modal_projector_w", 0, "encoder_multi_modal_projector_b");
    const pi0::Bf16* lang = w_.get("language_embeds").data;
    for (int i = 0; i < shape.prompt_len * lw; ++i) lm.push_back(pi0::bf16_to_float(lang[i]));

    const int qw = c_.lm_q_width(), qkvw = c_.qkv_width(), HD = c_.head_dim;
    Mat kv(static_cast<size_t>(c_.lm_layers) * 2 * E * HD);
    for (int l = 0; l < c_.lm_layers; ++l) {
      Mat qkv = linear(rms(lm, E, lw), E, lw, qkvw, "encoder_attn_qkv_w", l);
      for (int t = 0; t < E; ++t)
        for (int hh = 0; hh <= c_.lm_heads; ++hh)
          rope(&qkv[t * qkvw + hh * HD], t);  // Q heads, then K
      for (int t = 0; t < E; ++t)
        for (int i = 0; i < HD; ++i) {
          kv[((l * 2 + 0) * static_cast<size_t>(E) + t) * HD + i] = qkv[t * qkvw + qw + i];
          kv[((l * 2 + 1) * static_cast<size_t>(E) + t) * HD + i] = qkv[t * qkvw + qw + HD + i];
        }
      if (l == c_.lm_layers - 1) break;
      Mat attn(static_cast<size_t>(E) * qw);
      std::vector<const double*> k, v;
      for (int j = 0; j < E; ++j) {
        k.push_back(&qkv[j * qkvw + qw]);
        v.push_back(&qkv[j * qkvw + qw + HD]);
      }
      for (int t = 0; t < E; ++t)
        for (int hh = 0; hh < c_.lm_heads; ++hh)
          attend(&qkv[t * qkvw + hh * HD], k, v, HD, &attn[t * qw + hh * HD]);
      const Mat o = linear(attn, E, qw, lw, "encoder_attn_o_w", l);
      for (size_t i = 0; i < lm.size(); ++i) lm[i] += o[i];
      mlp(lm, E, lw, c_.lm_mlp, "encoder", l);
    }
    return kv;
  }

  void mlp(Mat& x, int rows, int width, int hidden, const std::string& tower, int l) const {
    const Mat h = rms(x, rows, width);
    Mat g = linear(h, rows, width, hidden, tower + "_ffn_gate_w", l);
    const Mat u = linear(h, rows, width, hidden, tower + "_ffn_up_w", l);
    for (size_t i = 0; i < g.size(); ++i) g[i] = gelu(g[i]) * u[i];
    const Mat d = linear(g, rows, hidden, width, tower + "_ffn_down_w", l);
    for (size_t i = 0; i < x.size(); ++i) x[i] += d[i];
  }

  // The decoder on a double K/V cache: the final sample [C, action_dim].
  Mat decode(const pi0::RunShape& shape, const Mat& kv, const pi0::Bf16* state,
             const pi0::Bf16* noise) const {
    const int C = shape.chunk, E = shape.prefix_len(c_), aw = c_.action_width, ad = c_.action_dim;
    const int qw = c_.lm_q_width(), qkvw = c_.qkv_width(), HD = c_.head_dim;
    Mat st(c_.state_dim), sample(static_cast<size_t>(C) * ad);
    for (int i = 0; i < c_.state_dim; ++i) st[i] = pi0::bf16_to_float(state[i]);
    for (size_t i = 0; i < sample.size(); ++i) sample[i] = pi0::bf16_to_float(noise[i]);
    const Mat s =
        linear(st, 1, c_.state_dim, aw, "decoder_state_in_proj_w", 0, "decoder_state_in_proj_b");
    for (int step = 0; step < c_.flow_steps; ++step) {
      Mat a = linear(sample, C, ad, aw, "decoder_action_fused_in_proj_w", 0);
      const pi0::Bf16* tb =
          w_.get("decoder_action_fused_time_biases").data + static_cast<size_t>(step) * aw;
      for (int r = 0; r < C; ++r)
        for (int i = 0; i < aw; ++i) {
          const double z = a[r * aw + i] + pi0::bf16_to_float(tb[i]);
          a[r * aw + i] = z / (1 + std::exp(-z));
        }
      Mat x = s;
      const Mat act = linear(a, C, aw, aw, "decoder_action_mlp_w", 0, "decoder_action_mlp_b");
      x.insert(x.end(), act.begin(), act.end());
      for (int l = 0; l < c_.lm_layers; ++l) {
        Mat qkv = linear(rms(x, C + 1, aw), C + 1, aw, qkvw, "decoder_attn_qkv_w", l);
        for (int t = 0; t <= C; ++t)
          for (int hh = 0; hh <= c_.lm_heads; ++hh) rope(&qkv[t * qkvw + hh * HD], E + t);
        Mat attn(static_cast<size_t>(C + 1) * qw);
        for (int t = 0; t <= C; ++t) {
          std::vector<const double*> k, v;
          for (int j = 0; j < E; ++j) {
            k.push_back(&kv[((l * 2 + 0) * static_cast<size_t>(E) + j) * HD]);
            v.push_back(&kv[((l * 2 + 1) * static_cast<size_t>(E) + j) * HD]);
          }
          for (int j = 0; j <= (t == 0 ? 0 : C); ++j) {
            k.push_back(&qkv[j * qkvw + qw]);
            v.push_back(&qkv[j * qkvw + qw + HD]);
          }
          for (int hh = 0; hh < c_.lm_heads; ++hh)
            attend(&qkv[t * qkvw + hh * HD], k, v, HD, &attn[t * qw + hh * HD]);
        }
        const Mat o = linear(attn, C + 1, qw, aw, "decoder_attn_o_w", l);
        for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
        mlp(x, C + 1, aw, c_.action_mlp, "decoder", l);
      }
      const Mat tail(x.begin() + aw, x.end());
      const Mat d = linear(rms(tail, C, aw), C, aw, ad, "decoder_action_fused_out_proj_w", 0,
                           "decoder_action_fused_out_proj_b");
      for (size_t i = 0; i < sample.size(); ++i) sample[i] += d[i];
    }
    return sample;
  }

 private:
  const pi0::ModelConfig& c_;
  const pi0::WeightStore& w_;
};

double rel_error(const std::vector<float>& got, const Mat& want) {
  double d = 0, n = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    d += (got[i] - want[i]) * (got[i] - want[i]);
    n += want[i] * want[i];
  }
  return std::sqrt(d / n);
}

}  // namespace

TEST_CASE("reference model matches a naive double precision model", "[common]") {
  const pi0::ModelConfig c = pi0::model_config("tiny");
  const pi0::RunShape shape{2, 5, 3};
  const auto weights = pi0::WeightStore::random(c, shape.prompt_len, 31, pi0::WeightSet::kAll);
  const auto in = pi0::make_frame_inputs(c, shape, 8, 2);
  const Naive naive(c, weights);
  const Mat kv_want = naive.encode(shape, in.images.data());
  const Mat out_want = naive.decode(shape, kv_want, in.state.data(), in.noise.data());

  const pi0::ReferenceEncoder encoder(c, weights);
  const pi0::ReferenceDecoder decoder(c, weights);
  std::vector<float> kv(pi0::stage_sizes(c, shape).kv_values);
  REQUIRE(kv.size() == kv_want.size());
  encoder.encode(shape, in.images.data(), kv.data());
  const double kv_err = rel_error(kv, kv_want);
  // The decoder runs on the naive cache so that its own error is measured alone.
  const std::vector<float> kv_naive(kv_want.begin(), kv_want.end());
  std::vector<float> out(pi0::stage_sizes(c, shape).action_values);
  decoder.decode(shape, kv_naive.data(), in.state.data(), in.noise.data(), out.data());
  const double out_err = rel_error(out, out_want);
  INFO("kv error " << kv_err << ", output error " << out_err);
  REQUIRE(kv_err < 1e-5);
  REQUIRE(out_err < 1e-5);
}
