// Decoder (action expert): 10 flow steps x lm_layers layers at C+1 rows, so every weight matrix
// is streamed once per step and the GEMMs are bound by weight reads; everything else is kept to
// one cheap kernel per operation, and the ~2,000 launches of a decode replay as one CUDA graph.
// The prefix K/V is not copied: the slot the encoder filled has C + 1 free rows after the E prefix
// rows of every K and V block (StageSizes::kv_slot_rows); the decoder writes its own keys and
// values there each layer and attention reads the [E + C + 1, head_dim] block in place.
// The flow sample lives in d_actions (fp32); the Euler update is a GEMM accumulating into it.
// The residual stream is bf16, so that the layers' RMS norms fold into the kernels after the
// products they feed (pi0/cuda/kernels.hpp, RowRmsScale): qkv and gate|up read the stream itself,
// and RoPE + K/V write and GeGLU scale each row, two launches fewer per layer and step. The skinny
// and persistent paths below keep an fp32 stream and the norms: their epilogues accumulate fp32.
// decode_batch() stacks the rows of several frames (each C + 1 rows, its own K/V slot) under the
// same weight GEMMs; only RoPE + K/V write and attention, which read and write a frame's own slot,
// and the small per-step action GEMMs, run once per frame.
// PI0_DECODER_SKINNY=1 runs the per-step weight GEMMs (M = C + 1 <= 64 rows) on the skinny GEMM
// kernel (pi0/cuda/skinny_gemm.hpp: split-K over clusters, fused bias / residual / GeGLU
// epilogues; wgmma with transposed layer weights on sm_90a builds) instead of cuBLASLt. Off by
// default: it is correct and deterministic but, as of bench/NOTES.md v7, 0.5 ms slower per decode.
#include "pi0/cuda_decoder.hpp"

#include <spdlog/spdlog.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "pi0/check.hpp"
#include "pi0/config.hpp"
#include "pi0/cuda/attention.hpp"
#include "pi0/cuda/decoder_layers.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/gemm.hpp"
#include "pi0/cuda/kernels.hpp"
#include "pi0/cuda/l2_prefetch.hpp"
#include "pi0/cuda/layer_signal.hpp"
#include "pi0/cuda/op_timer.hpp"
#include "pi0/cuda/qkv_rope.hpp"
#include "pi0/cuda/skinny_gemm.hpp"
#include "pi0/cuda/weights.hpp"
#include "pi0/reference.hpp"

namespace pi0 {

using cuda::DeviceBuffer;
using cuda::DType;
using cuda::Epilogue;
using cuda::Gemm;
using cuda::GemmShape;

struct CudaDecoder::Impl {
  ModelConfig cfg;
  RunShape shape;
  int prefix = 0;  // E
  int rows = 0;    // C + 1 suffix tokens
  int keys = 0;    // E + C + 1
  int max_batch = 1;
  cuda::MemoryLedger memory{"decoder"};
  double flops = 0.0;
  double bytes_read = 0.0;

  cuda::LtHandle lt;
  DeviceBuffer<std::byte> gemm_ws;

  DeviceBuffer<Bf16> state_w, ain_w, time_b, amlp_w, qkv_w, o_w, gate_up_w, down_w, aout_w;
  DeviceBuffer<float> aout_b;

  DeviceBuffer<Bf16> h, sample, t1, qkv, q, attn, gu, act;
  // The residual stream, the state token's row of it and the biases of the products that write
  // it: bf16 with the norms folded (fold_norms), fp32 otherwise; only the buffer of that type is
  // made.
  bool fold_norms = false;
  struct ResidualTyped {
    DeviceBuffer<Bf16> bf16;
    DeviceBuffer<float> f32;
    void* get() const { return bf16.empty() ? static_cast<void*>(f32.get()) : bf16.get(); }
  };
  ResidualTyped x, state_row, state_b, amlp_b;
  size_t residual_bytes() const { return fold_norms ? sizeof(Bf16) : sizeof(float); }
  // Row `row` of the residual stream.
  void* x_row(size_t row) const {
    return static_cast<std::byte*>(x.get()) + row * cfg.action_width * residual_bytes();
  }
  // What the qkv and gate|up products read: the stream itself with the norms folded, else h.
  const Bf16* normed() const { return fold_norms ? x.bf16.get() : h.get(); }

  // The GEMMs over all frames of a pass, one set per frame count (index count - 1).
  struct PassGemms {
    Gemm state, ain, qkv, o, gu, down;
  };
  std::vector<PassGemms> pass;
  // The layers' products of the first flow step (qkv, o, gate|up, down; one set per frame count),
  // which follows the encoder layer by layer beside it: the same shapes with a role of their
  // own, so that a GEMM table can choose them for running beside the encoder (without an entry
  // of their own they take their shape's).
  std::vector<PassGemms> first_step;
  Gemm g_amlp, g_aout;  // per frame
  bool skinny = false;
  // The work between flow steps (Euler update, action input, state tokens) in one kernel
  // (cuda::flow_step_glue) where the residual stream is bf16 and the widths fit; else six.
  // PI0_DECODER_STEP_GLUE=0 keeps the six.
  bool step_glue = false;
  cuda::SkinnyShape s_amlp, s_qkv, s_o, s_gu, s_down, s_aout;
  cuda::SharedKvAttention attention;
  // Where `attention` is the wgmma kernel, the first flow step runs the default kernels instead:
  // while it follows the encoder layer by layer, a cluster of 9 CTAs waits for 9 free SMs of one
  // GPC, which the encoder's GEMMs beside it hold (bench/NOTES.md v21). Whether it follows or
  // not, so that both schedules give the same bits.
  cuda::SharedKvAttention first_step_attention;
  // The attention flow step `step` runs.
  cuda::SharedKvAttention& attention_for(int step) {
    return step == 0 && attention.on_wgmma() ? first_step_attention : attention;
  }
  // Opt-in: one-frame passes run every layer of a step in one persistent kernel (see
  // pi0/cuda/decoder_layers.hpp); multi-frame passes and unsupported shapes use the ops below.
  cuda::DecoderLayers layers_kernel;
  // One graph per pass shape: each slot alone and each run of slots decoded together.
  cuda::GraphCache graphs{64};
  // Each layer's remaining weights (o, gate|up, down: 29 MB at pi0's widths), the next layer's
  // qkv and its K/V blocks are pulled into L2 on a side stream while this layer's attention runs,
  // which leaves memory bandwidth idle; the GEMMs then find them in L2 (V=2 on an H100: 14.72 ->
  // 14.33 ms for the weights, 14.26 with the K/V; bench/NOTES.md v10). Prefetching in two parts,
  // the second after the o GEMM, was slower than none: it competes with the gate|up GEMM.
  // PI0_DECODER_PREFETCH=0 turns it off.
  bool prefetch = false;
  cuda::L2Prefetcher prefetcher;
  void prefetch_layer_weights(int layer, Bf16* const* kv_slots, int count, cudaStream_t s,
                              bool next_reads_qkv_wt = false);
  // Opt-in (PI0_DECODER_QKV_ROPE=1): flow steps 2-10 of one-frame passes run the qkv product,
  // its folded norm, RoPE and the K/V write as one kernel (qkv_rope.hpp, over W^T: qkv_wt)
  // instead of cuBLASLt's product and rope_split_qkv, one kernel boundary fewer a layer-step. Off
  // by default: one H100 gained with it (V=2 12.93-13.04 -> 12.77-12.80 ms, bench/NOTES.md v37),
  // but two others lost 0.08-0.21 ms in four paired runs (v38), and it costs a 94 MB transposed
  // copy of the qkv weights. The first step keeps the two kernels either way: beside the encoder,
  // 80 CTAs of 193 KB of shared memory each would wait for SMs the encoder's GEMMs hold (v28).
  bool qkv_rope_later = false;
  DeviceBuffer<Bf16> qkv_wt;
  cuda::QkvRopeShape qkv_rope_shape;

  std::vector<cuda::TunableGemm> tunables;  // with options.autotune_inplace

  cuda::OpTimer* timer = nullptr;
  void mark(const char* label, cudaStream_t s) {
    if (timer) timer->mark(label, s);
  }

  Gemm gemm(const GemmShape& s) { return Gemm(lt.get(), s, gemm_ws.get(), gemm_ws.bytes()); }

  Impl(const ModelConfig& config, const RunShape& run_shape, const WeightStore& w,
       const CudaEngineOptions& options);
  void forward(Bf16* const* kv_slots, int count, const Bf16* state, const Bf16* noise,
               float* actions, const cuda::LayerWait* waits, const cuda::LayerWaitLimits* limits,
               cudaStream_t stream);
  Bf16* kv_slice(Bf16* kv_slot, int layer, int which) const {
    return kv_slot + kv_offset(cfg, keys, layer, which);
  }
};

namespace {

// Operands that start at a row offset or come from the caller are only 16-byte aligned.
GemmShape loosely_aligned(GemmShape s) {
  s.alignment = 16;
  return s;
}

}  // namespace

CudaDecoder::Impl::Impl(const ModelConfig& config, const RunShape& run_shape, const WeightStore& w,
                        const CudaEngineOptions& options)
    : cfg(config), shape(run_shape) {
  cfg.validate();
  shape.validate();
  max_batch = options.max_decode_batch;
  PI0_CHECK(max_batch >= 1 && max_batch <= 4,
            "CudaDecoder: max_decode_batch must be 1..4, got " + std::to_string(max_batch));
  cuda::check_weights(cfg, shape.prompt_len, WeightSet::kDecoder, w, "CudaDecoder");
  prefix = shape.prefix_len(cfg);
  rows = shape.chunk + 1;
  keys = prefix + rows;
  const int aw = cfg.action_width, am = cfg.action_mlp, qkv_width = cfg.qkv_width();
  const int qw = cfg.lm_q_width(), ad = cfg.action_dim, c = shape.chunk;

  gemm_ws = memory.work<std::byte>(cuda::kGemmWorkspaceBytes, "cuBLASLt workspace");

  // Plans use a fixed SM count so that every process (MPS-limited or not) picks the same splits
  // and so computes the same bits.
  constexpr int kPlanSms = 132;
  auto skinny_shape = [](int m, int n, int k, int ld_y, cuda::SkinnyOut out, bool bias) {
    cuda::SkinnyShape s;
    s.m = m;
    s.n = n;
    s.k = k;
    s.ld_x = k;
    s.ld_w = n;
    s.ld_y = ld_y;
    s.out = out;
    s.bias = bias;
    return s;
  };
  s_amlp = skinny_shape(c, aw, aw, aw, cuda::SkinnyOut::kF32, true);
  s_qkv = skinny_shape(rows, qkv_width, aw, qkv_width, cuda::SkinnyOut::kBf16, false);
  s_o = skinny_shape(rows, aw, qw, aw, cuda::SkinnyOut::kF32Accumulate, false);
  s_gu = skinny_shape(rows, 2 * am, aw, am, cuda::SkinnyOut::kGeglu, false);
  s_down = skinny_shape(rows, aw, am, aw, cuda::SkinnyOut::kF32Accumulate, false);
  s_aout = skinny_shape(c, ad, aw, ad, cuda::SkinnyOut::kF32Accumulate, true);
  skinny = env_switch("PI0_DECODER_SKINNY", false);
  for (const cuda::SkinnyShape* s : {&s_amlp, &s_qkv, &s_o, &s_gu, &s_down, &s_aout})
    skinny = skinny && cuda::skinny_supported(*s);
  if (skinny && max_batch > 1) {
    // Its gate|up weights are interleaved for the fused GeGLU epilogue, which the cuBLASLt GEMMs
    // of a multi-frame pass cannot read.
    spdlog::warn("PI0_DECODER_SKINNY is ignored with more than one frame per decoder pass");
    skinny = false;
  }
  // On the wgmma mainloop the per-layer weights are uploaded transposed ([out, in]): each CTA then
  // streams its columns as contiguous memory, which is faster (bench/NOTES.md v7).
  const bool transposed_weights = skinny && cuda::skinny_wgmma_available();
  if (transposed_weights) {
    for (cuda::SkinnyShape* s : {&s_qkv, &s_o, &s_gu, &s_down}) {
      s->kernel = cuda::SkinnyKernel::kWgmma;
      s->w_transposed = true;
      s->ld_w = s->k;
    }
  }
  if (skinny) {
    for (cuda::SkinnyShape* s : {&s_amlp, &s_qkv, &s_o, &s_gu, &s_down, &s_aout})
      *s = cuda::plan_skinny(*s, kPlanSms);
    cuda::skinny_init();
    spdlog::info("decoder: weight GEMMs on the skinny kernel ({} mainloop{})",
                 s_qkv.kernel == cuda::SkinnyKernel::kWgmma ? "wgmma" : "mma.sync",
                 transposed_weights ? ", layer weights transposed" : "");
  }

  const bool layers_wanted =
      options.decoder_persistent_layers || env_switch("PI0_DECODER_LAYERS", false);
  cuda::DecoderLayersShape layers_shape;
  layers_shape.rows = rows;
  layers_shape.prefix = prefix;
  layers_shape.width = aw;
  layers_shape.q_heads = cfg.lm_heads;
  layers_shape.head_dim = cfg.head_dim;
  layers_shape.mlp = am;
  layers_shape.layers = cfg.lm_layers;
  layers_shape.rms_eps = cfg.rms_eps;
  layers_shape.rope_theta = cfg.rope_theta;
  const std::string layers_unsupported = cuda::DecoderLayers::unsupported_reason(layers_shape);
  if (layers_wanted && !skinny && layers_unsupported.empty()) {
    layers_kernel = cuda::DecoderLayers(layers_shape, options.decoder_layers_ctas);
    memory.add_workspace(layers_kernel.scratch_bytes());
  } else if (layers_wanted) {
    spdlog::warn("decoder: persistent layers kernel not used ({})",
                 skinny ? "PI0_DECODER_SKINNY is on" : layers_unsupported);
  }

  fold_norms = !skinny && !layers_kernel.valid();
  step_glue = fold_norms && cuda::flow_step_glue_supported(cfg.action_width, cfg.action_dim) &&
              env_switch("PI0_DECODER_STEP_GLUE", true);  // 0: the six kernels
  qkv_rope_shape = {rows, cfg.action_width, cfg.lm_heads, cfg.head_dim};
  qkv_rope_later = fold_norms && env_switch("PI0_DECODER_QKV_ROPE", false) &&
                   cuda::qkv_rope_supported(qkv_rope_shape) &&
                   cuda::qkv_rope_fits_at_once(qkv_rope_shape);

  state_w = memory.weight(cuda::upload_tensor(w, "decoder_state_in_proj_w"));
  auto upload_residual_bias = [&](const char* name) {
    ResidualTyped b;
    if (fold_norms) {
      b.bf16 = memory.weight(cuda::upload_tensor(w, name));
    } else {
      b.f32 = memory.weight(cuda::upload_tensor_f32(w, name));
    }
    return b;
  };
  state_b = upload_residual_bias("decoder_state_in_proj_b");
  amlp_b = upload_residual_bias("decoder_action_mlp_b");
  ain_w = memory.weight(cuda::upload_tensor(w, "decoder_action_fused_in_proj_w"));
  time_b = memory.weight(cuda::upload_tensor(w, "decoder_action_fused_time_biases"));
  amlp_w = memory.weight(cuda::upload_tensor(w, "decoder_action_mlp_w"));
  const long layers = cfg.lm_layers;
  // A stacked [layers, in, out] weight, transposed per layer to [layers, out, in].
  auto upload_transposed = [&](const std::string& name, long in, long out) {
    const TensorView& t = w.get(name);
    PI0_CHECK(t.numel == static_cast<size_t>(layers * in * out), "decoder: " + name + " shape");
    return cuda::upload(cuda::transpose_layers(t.data, layers, in, out),
                        "weight " + name + " transposed");
  };
  if (qkv_rope_later)
    qkv_wt = memory.weight(upload_transposed("decoder_attn_qkv_w", aw, qkv_width));
  if (transposed_weights) {
    qkv_w = memory.weight(upload_transposed("decoder_attn_qkv_w", aw, qkv_width));
    o_w = memory.weight(upload_transposed("decoder_attn_o_w", qw, aw));
  } else {
    qkv_w = memory.weight(cuda::upload_tensor(w, "decoder_attn_qkv_w"));
    o_w = memory.weight(cuda::upload_tensor(w, "decoder_attn_o_w"));
  }
  if (skinny) {
    // Gate and up interleaved in blocks of 8 columns, for the GeGLU epilogue.
    const TensorView& gate = w.get("decoder_ffn_gate_w");
    const TensorView& up = w.get("decoder_ffn_up_w");
    PI0_CHECK(gate.shape == up.shape && gate.numel % am == 0, "decoder: gate/up shapes differ");
    std::vector<Bf16> interleaved(2 * gate.numel);
    cuda::interleave_gate_up(gate.data, up.data, interleaved.data(),
                             static_cast<long>(gate.numel / am), am);
    if (transposed_weights)
      interleaved = cuda::transpose_layers(interleaved.data(), layers, aw, 2L * am);
    gate_up_w =
        memory.weight(cuda::upload(interleaved, "weight decoder_ffn_gate_w / up_w interleaved"));
  } else {
    gate_up_w =
        memory.weight(cuda::upload_side_by_side(w, "decoder_ffn_gate_w", "decoder_ffn_up_w"));
  }
  down_w = memory.weight(transposed_weights ? upload_transposed("decoder_ffn_down_w", am, aw)
                                            : cuda::upload_tensor(w, "decoder_ffn_down_w"));
  if (layers_kernel.valid()) {
    layers_kernel.set_weights({qkv_w.get(), o_w.get(), gate_up_w.get(), down_w.get()});
    memory.add_workspace(layers_kernel.weight_copy_bytes());
  }
  aout_w = memory.weight(cuda::upload_tensor(w, "decoder_action_fused_out_proj_w"));
  aout_b = memory.weight(cuda::upload_tensor_f32(w, "decoder_action_fused_out_proj_b"));

  const size_t r = static_cast<size_t>(rows) * max_batch;  // rows of a full pass
  const size_t cb = static_cast<size_t>(c) * max_batch;
  auto residual_work = [&](size_t count, const char* what) {
    ResidualTyped b;
    if (fold_norms) {
      b.bf16 = memory.work<Bf16>(count, what);
    } else {
      b.f32 = memory.work<float>(count, what);
    }
    return b;
  };
  x = residual_work(r * aw, "residual");
  state_row = residual_work(static_cast<size_t>(max_batch) * aw, "state token");
  const DType residual_type = fold_norms ? DType::kBf16 : DType::kF32;
  h = memory.work<Bf16>(r * aw, "normed");  // with fold_norms, only for the Euler step
  sample = memory.work<Bf16>(cb * ad, "sample (bf16)");
  t1 = memory.work<Bf16>(cb * aw, "action in");
  qkv = memory.work<Bf16>(r * qkv_width, "qkv");
  q = memory.work<Bf16>(r * qw, "q");
  attn = memory.work<Bf16>(r * qw, "attention");
  gu = memory.work<Bf16>(skinny ? 8 : r * 2 * am, "gate|up");
  act = memory.work<Bf16>(r * am, "geglu");

  for (int b = 1; b <= max_batch; ++b) {
    PassGemms g;
    g.state = gemm(loosely_aligned(
        cuda::linear_shape(b, aw, cfg.state_dim, residual_type, Epilogue::kBias, false)));
    g.ain = gemm(cuda::linear_shape(b * c, aw, ad, DType::kBf16, Epilogue::kBias, false));
    g.qkv = gemm(cuda::linear_shape(b * rows, qkv_width, aw, DType::kBf16, Epilogue::kNone, false));
    g.o = gemm(cuda::linear_shape(b * rows, aw, qw, residual_type, Epilogue::kNone, true));
    g.gu = gemm(cuda::linear_shape(b * rows, 2 * am, aw, DType::kBf16, Epilogue::kNone, false));
    g.down = gemm(cuda::linear_shape(b * rows, aw, am, residual_type, Epilogue::kNone, true));
    PassGemms f;
    auto beside_encoder = [](GemmShape shape) {
      shape.role = "first step";
      return shape;
    };
    f.qkv = gemm(beside_encoder(g.qkv.shape()));
    f.o = gemm(beside_encoder(g.o.shape()));
    f.gu = gemm(beside_encoder(g.gu.shape()));
    f.down = gemm(beside_encoder(g.down.shape()));
    pass.push_back(std::move(g));
    first_step.push_back(std::move(f));
  }
  g_amlp =
      gemm(loosely_aligned(cuda::linear_shape(c, aw, aw, residual_type, Epilogue::kBias, false)));
  g_aout = gemm(loosely_aligned(cuda::linear_shape(c, ad, aw, DType::kF32, Epilogue::kBias, true)));
  const PassGemms& one = pass.front();

  // The tiled kernels where cuBLASLt's products would be misaligned, else the wgmma kernel at
  // head size 256 (its first step: QK GEMM + softmax + PV GEMM; not in the MPS pipeline's
  // worker below half the GPU, CudaEngineOptions::decoder_share_percent), else the GEMMs;
  // PI0_DECODER_ATTENTION = gemm | fused | tiled | wgmma overrides (bench/NOTES.md v4, v16, v17,
  // v20, v21).
  cuda::SharedKvAttention::Params attention_params{
      rows, cfg.lm_heads, cfg.head_dim, keys, 1.0f / std::sqrt(static_cast<float>(cfg.head_dim)),
      1,    prefix + 1};
  const cuda::AttentionKernels first_step_kernels =
      cuda::default_attention_kernels(rows * cfg.lm_heads, keys);
  attention_params.kernels = cuda::attention_kernels_from_env(
      "PI0_DECODER_ATTENTION",
      options.decoder_share_percent < CudaEngineOptions::kWgmmaMinSharePercent
          ? first_step_kernels
          : cuda::default_decoder_attention_kernels(rows * cfg.lm_heads, keys, cfg.head_dim));
  attention = cuda::SharedKvAttention(lt.get(), attention_params, gemm_ws.get(), gemm_ws.bytes());
  memory.add_workspace(attention.scratch_bytes());
  if (attention_params.kernels == cuda::AttentionKernels::kWgmma && !attention.on_wgmma())
    spdlog::info(
        "decoder attention: the wgmma kernel cannot run here (no sm_90a code for this GPU, or its "
        "cluster does not fit this SM share); every flow step runs the GEMMs");
  if (attention.on_wgmma()) {
    attention_params.kernels = first_step_kernels;
    first_step_attention =
        cuda::SharedKvAttention(lt.get(), attention_params, gemm_ws.get(), gemm_ws.bytes());
    memory.add_workspace(first_step_attention.scratch_bytes());
  }

  prefetch = env_switch("PI0_DECODER_PREFETCH", true);

  const double steps = cfg.flow_steps;
  const double per_layer = one.qkv.shape().flops() + one.o.shape().flops() +
                           one.gu.shape().flops() + one.down.shape().flops() + attention.flops();
  flops = one.state.shape().flops() + steps * (one.ain.shape().flops() + g_amlp.shape().flops() +
                                               g_aout.shape().flops() + cfg.lm_layers * per_layer);
  bytes_read =
      static_cast<double>(state_w.bytes()) +
      steps * static_cast<double>(ain_w.bytes() + amlp_w.bytes() + qkv_w.bytes() + o_w.bytes() +
                                  gate_up_w.bytes() + down_w.bytes() + aout_w.bytes());

  if (options.autotune_gemms && !skinny) {
    cudaStream_t s = nullptr;
    cuda::fill_random(h.get(), h.size(), 11, 1.0f, s);
    cuda::fill_random(sample.get(), sample.size(), 12, 1.0f, s);
    cuda::fill_random(t1.get(), t1.size(), 13, 1.0f, s);
    cuda::fill_random(attn.get(), attn.size(), 14, 1.0f, s);
    cuda::fill_random(act.get(), act.size(), 15, 1.0f, s);
    if (fold_norms) {
      cuda::fill_random(x.bf16.get(), x.bf16.size(), 16, 1.0f, s);
    } else {
      cuda::fill_random(x.f32.get(), x.f32.size(), 16, 1.0f, s);
    }
    // Per-layer weights are timed over every layer's copy, as a decode streams them.
    Gemm::AutotuneOptions tune;
    tune.wide = options.autotune_wide;
    auto per_layer = [&](size_t stride) { return tune.over_layers(cfg.lm_layers, stride); };
    // In-place tuning (options.autotune_inplace) is for the one-frame pass's products, and its
    // layers' products only where they run (not under the persistent layers kernel).
    std::vector<cuda::TunableGemm>* in_place = options.autotune_inplace ? &tunables : nullptr;
    std::vector<cuda::TunableGemm>* layers_in_place = layers_kernel.valid() ? nullptr : in_place;
    auto tune_gemm = [&](const char* label, Gemm& g, const void* gx, const void* gw, void* gy,
                         const void* gb, const Gemm::AutotuneOptions& o, bool one_frame) {
      cuda::autotune_gemm(g, gx, gw, gy, gb, s, o, label, one_frame ? in_place : nullptr);
    };
    tune_gemm("decoder action mlp", g_amlp, t1.get(), amlp_w.get(), x_row(1), amlp_b.get(), tune,
              true);
    auto tune_layer_gemm = [&](const char* label, Gemm& g, const void* gx, const void* gw, void* gy,
                               const Gemm::AutotuneOptions& o, bool one_frame) {
      cuda::autotune_gemm(g, gx, gw, gy, nullptr, s, o, label,
                          one_frame ? layers_in_place : nullptr);
    };
    // A layer's four weight products, labelled "<stage> qkv" and so on.
    auto tune_weight_gemms = [&](const std::string& stage, PassGemms& g, bool one_frame) {
      tune_layer_gemm((stage + " qkv").c_str(), g.qkv, normed(), qkv_w.get(), qkv.get(),
                      per_layer(static_cast<size_t>(aw) * qkv_width), one_frame);
      tune_layer_gemm((stage + " o + residual").c_str(), g.o, attn.get(), o_w.get(), x.get(),
                      per_layer(static_cast<size_t>(qw) * aw), one_frame);
      tune_layer_gemm((stage + " gate|up").c_str(), g.gu, normed(), gate_up_w.get(), gu.get(),
                      per_layer(static_cast<size_t>(aw) * 2 * am), one_frame);
      tune_layer_gemm((stage + " down + residual").c_str(), g.down, act.get(), down_w.get(),
                      x.get(), per_layer(static_cast<size_t>(am) * aw), one_frame);
    };
    for (PassGemms& g : pass) {
      const bool one_frame = &g == &pass.front();
      tune_gemm("decoder action in", g.ain, sample.get(), ain_w.get(), t1.get(), time_b.get(), tune,
                one_frame);
      tune_weight_gemms("decoder", g, one_frame);
    }
    // Tuned alone, the first step's products would choose as the others did: they take those
    // choices (so that the steps agree), and are tuned for their own surroundings only in place.
    const bool first_step_in_place = layers_in_place != nullptr;
    for (size_t b = 0; b < first_step.size(); ++b) {
      PassGemms& f = first_step[b];
      const PassGemms& g = pass[b];
      if (first_step_in_place && b == 0) {
        const size_t before = tunables.size();
        tune_weight_gemms("decoder first step", f, true);
        for (size_t i = before; i < tunables.size(); ++i) tunables[i].overlapped = true;
        continue;
      }
      for (auto [mine, theirs] : {std::pair{&f.qkv, &g.qkv}, std::pair{&f.o, &g.o},
                                  std::pair{&f.gu, &g.gu}, std::pair{&f.down, &g.down}})
        (void)mine->select_like(*theirs);
    }
    CUDA_CHECK(cudaDeviceSynchronize());
  }
}

void CudaDecoder::Impl::prefetch_layer_weights(int layer, Bf16* const* kv_slots, int count,
                                               cudaStream_t s, bool next_reads_qkv_wt) {
  const size_t aw = cfg.action_width, am = cfg.action_mlp, qw = cfg.lm_q_width();
  const size_t qkv_width = cfg.qkv_width(), l = layer;
  const size_t next = (l + 1) % static_cast<size_t>(cfg.lm_layers);
  cuda::L2Range ranges[cuda::kMaxL2Ranges] = {
      {o_w.get() + l * qw * aw, qw * aw * sizeof(Bf16)},
      {gate_up_w.get() + l * aw * 2 * am, aw * 2 * am * sizeof(Bf16)},
      {down_w.get() + l * am * aw, am * aw * sizeof(Bf16)},
      {(next_reads_qkv_wt ? qkv_wt.get() : qkv_w.get()) + next * aw * qkv_width,
       aw * qkv_width * sizeof(Bf16)}};
  // And each frame's K and V blocks (adjacent in the slot) for the next layer's attention: 4 + at
  // most 4 frames a pass (max_decode_batch) fit kMaxL2Ranges.
  int n = 4;
  for (int f = 0; f < count && n < cuda::kMaxL2Ranges; ++f)
    ranges[n++] = {kv_slice(kv_slots[f], static_cast<int>(next), 0),
                   2 * static_cast<size_t>(keys) * cfg.head_dim * sizeof(Bf16)};
  prefetcher.prefetch(ranges, n, s);
}

void CudaDecoder::Impl::forward(Bf16* const* kv_slots, int count, const Bf16* state,
                                const Bf16* noise, float* actions, const cuda::LayerWait* waits,
                                const cuda::LayerWaitLimits* limits, cudaStream_t s) {
  const int aw = cfg.action_width, am = cfg.action_mlp, qkv_width = cfg.qkv_width();
  const int qw = cfg.lm_q_width(), ad = cfg.action_dim, c = shape.chunk;
  PassGemms& g = pass[static_cast<size_t>(count - 1)];
  const int pass_rows = count * rows;
  const size_t frame_actions = static_cast<size_t>(c) * ad;
  // Frame f's rows: the state token, then its C action tokens.
  auto frame_row = [&](int f) { return static_cast<size_t>(f) * rows; };
  const bool persistent = count == 1 && layers_kernel.valid();
  // The folded norm's scale source for frame f's rows (f < 0: every row of the pass); none when
  // the norms run as kernels of their own.
  auto rms_of_frame = [&](int f) {
    if (!fold_norms) return cuda::RowRmsScale{};
    return cuda::RowRmsScale{x.bf16.get() + (f < 0 ? 0 : frame_row(f) * aw), aw, cfg.rms_eps};
  };
  // Layer l of the first step waits for the encoder's layer l of every frame's slot; the later
  // steps find every layer written.
  auto wait_for_layer = [&](int step, int l) {
    if (!waits || step != 0) return;
    for (int f = 0; f < count; ++f)
      cuda::wait_layer(waits[f].counters + l, waits[f].expected, l, *limits,
                       l == cfg.lm_layers - 1 ? waits[f].done_at : nullptr, s);
    mark("wait for the encoder's layer", s);
  };

  if (timer) timer->begin(s);
  prefetcher.begin();
  g.state.run(state, state_w.get(), state_row.get(), state_b.get(), s);
  cuda::bf16_to_f32(noise, actions, count * frame_actions, s);
  mark("state proj + noise in", s);

  // The Euler update of step - 1 (none before the first step), the action input of `step` (none
  // after the last) and the state tokens, in one kernel.
  auto glue = [&](int step) {
    cuda::FlowStepGlue gl;
    gl.x = x.bf16.get();
    gl.rows_per_frame = rows;
    gl.width = aw;
    gl.eps = cfg.rms_eps;
    gl.actions = actions;
    gl.frames = count;
    gl.chunk = c;
    gl.action_dim = ad;
    if (step > 0) {
      gl.w_out = aout_w.get();
      gl.b_out = aout_b.get();
    }
    if (step < cfg.flow_steps) {
      gl.state = state_row.bf16.get();
      gl.w_in = ain_w.get();
      gl.time_bias = time_b.get() + static_cast<size_t>(step) * aw;
      gl.t1 = t1.get();
    }
    cuda::flow_step_glue(gl, s);
    mark(step == 0               ? "action in + state token"
         : step < cfg.flow_steps ? "euler + action in + state token"
                                 : "euler",
         s);
  };

  for (int step = 0; step < cfg.flow_steps; ++step) {
    if (step_glue) {
      glue(step);
    } else {
      cuda::f32_to_bf16(actions, sample.get(), count * frame_actions, s);
      mark("action in: sample to bf16", s);
      g.ain.run(sample.get(), ain_w.get(), t1.get(), time_b.get() + static_cast<size_t>(step) * aw,
                s);
      mark("action in: gemm + time bias", s);
      cuda::silu_inplace(t1.get(), static_cast<size_t>(count) * c * aw, s);
      mark("action in: silu", s);
    }
    for (int f = 0; f < count; ++f) {
      const Bf16* t1_f = t1.get() + static_cast<size_t>(f) * c * aw;
      void* x_actions = x_row(frame_row(f) + 1);
      if (skinny) {
        cuda::skinny_gemm(s_amlp, t1_f, amlp_w.get(), x_actions, amlp_b.f32.get(), s);
      } else {
        g_amlp.run(t1_f, amlp_w.get(), x_actions, amlp_b.get(), s);
      }
    }
    mark("action in: mlp gemm", s);
    if (!step_glue) {
      // Each frame's state token heads its rows.
      const size_t row_bytes = aw * residual_bytes();
      CUDA_CHECK(cudaMemcpy2DAsync(x.get(), rows * row_bytes, state_row.get(), row_bytes, row_bytes,
                                   count, cudaMemcpyDeviceToDevice, s));
      mark("state token copy", s);
    }
    if (persistent) {
      for (int l = 0; l < cfg.lm_layers; ++l) wait_for_layer(step, l);
      // Leaves h = rms(x) for the Euler step.
      layers_kernel.run({x.f32.get(), h.get(), q.get(), attn.get(), act.get(), kv_slots[0]}, s);
      mark("layers (persistent kernel)", s);
    }
    // The layers' products: the first step's own set (its role in a GEMM table), then the pass's.
    PassGemms& gl = step == 0 ? first_step[static_cast<size_t>(count - 1)] : g;
    for (int l = 0; l < cfg.lm_layers && !persistent; ++l) {
      const size_t ll = static_cast<size_t>(l);
      const size_t suffix = static_cast<size_t>(prefix) * cfg.head_dim;
      if (!fold_norms) {
        cuda::rms_norm(x.f32.get(), h.get(), pass_rows, aw, cfg.rms_eps, s);
        mark("rmsnorm", s);
      }
      const bool fused_qkv = qkv_rope_later && step > 0 && count == 1;
      // Whether the layer after this one reads W^T (the prefetch brings that copy).
      const bool next_fused =
          qkv_rope_later && count == 1 && (l + 1 < cfg.lm_layers ? step > 0 : true);
      if (fused_qkv) {
        cuda::qkv_rope(qkv_rope_shape, normed(), qkv_wt.get() + ll * aw * qkv_width, q.get(),
                       kv_slice(kv_slots[0], l, 0) + suffix, kv_slice(kv_slots[0], l, 1) + suffix,
                       prefix, cfg.rope_theta, cfg.rms_eps, s);
        mark("qkv + rms + rope + kv write", s);
        if (prefetch) prefetch_layer_weights(l, kv_slots, count, s, next_fused);
      } else {
        if (skinny) {
          cuda::skinny_gemm(s_qkv, h.get(), qkv_w.get() + ll * aw * qkv_width, qkv.get(), nullptr,
                            s);
        } else {
          gl.qkv.run(normed(), qkv_w.get() + ll * aw * qkv_width, qkv.get(), nullptr, s);
        }
        mark("qkv gemm", s);
        // While the first step follows the encoder layer by layer, the encoder runs beside it:
        // prefetching would take DRAM bandwidth and L2 from the stage being waited for (single
        // process, H100: V=2 14.01 against 14.10-14.14 ms with it).
        if (prefetch && !(waits && step == 0))
          prefetch_layer_weights(l, kv_slots, count, s, next_fused);
        for (int f = 0; f < count; ++f) {
          Bf16* k = kv_slice(kv_slots[f], l, 0);
          Bf16* v = kv_slice(kv_slots[f], l, 1);
          cuda::rope_split_qkv(qkv.get() + frame_row(f) * qkv_width, rows, cfg.lm_heads,
                               cfg.head_dim, prefix, cfg.rope_theta, q.get() + frame_row(f) * qw,
                               k + suffix, v + suffix, s, rms_of_frame(f));
        }
        mark(fold_norms ? "rms + rope + kv write" : "rope + kv write", s);
      }
      wait_for_layer(step, l);
      cuda::SharedKvAttention& att = attention_for(step);
      for (int f = 0; f < count; ++f) {
        att.run(q.get() + frame_row(f) * qw, kv_slice(kv_slots[f], l, 0),
                kv_slice(kv_slots[f], l, 1), attn.get() + frame_row(f) * qw, s, timer);
      }
      if (skinny) {
        cuda::skinny_gemm(s_o, attn.get(), o_w.get() + ll * qw * aw, x.get(), nullptr, s);
      } else {
        gl.o.run(attn.get(), o_w.get() + ll * qw * aw, x.get(), nullptr, s);
      }
      mark("o gemm + residual", s);
      if (!fold_norms) {
        cuda::rms_norm(x.f32.get(), h.get(), pass_rows, aw, cfg.rms_eps, s);
        mark("rmsnorm", s);
      }
      if (skinny) {
        cuda::skinny_gemm(s_gu, h.get(), gate_up_w.get() + ll * aw * 2 * am, act.get(), nullptr, s);
        mark("gate|up gemm + geglu", s);
      } else {
        gl.gu.run(normed(), gate_up_w.get() + ll * aw * 2 * am, gu.get(), nullptr, s);
        mark("gate|up gemm", s);
        cuda::geglu(gu.get(), act.get(), pass_rows, am, s, rms_of_frame(-1));
        mark(fold_norms ? "rms + geglu" : "geglu", s);
      }
      if (skinny) {
        cuda::skinny_gemm(s_down, act.get(), down_w.get() + ll * am * aw, x.get(), nullptr, s);
      } else {
        gl.down.run(act.get(), down_w.get() + ll * am * aw, x.get(), nullptr, s);
      }
      mark("down gemm + residual", s);
    }
    if (step_glue) continue;  // the next glue kernel runs this step's Euler update
    // Euler step on each frame's action rows: sample += rms(x[1..C]) @ W_aout + b_aout. One
    // norm over every row of the pass (row by row, so the action rows get the same bits; the
    // state rows' results are not read).
    if (fold_norms) {
      cuda::rms_norm(x.bf16.get(), h.get(), pass_rows, aw, cfg.rms_eps, s);
    } else if (!persistent) {
      cuda::rms_norm(x.f32.get(), h.get(), pass_rows, aw, cfg.rms_eps, s);
    }
    for (int f = 0; f < count; ++f) {
      const size_t first = (frame_row(f) + 1) * aw;
      float* actions_f = actions + f * frame_actions;
      if (skinny) {
        cuda::skinny_gemm(s_aout, h.get() + first, aout_w.get(), actions_f, aout_b.get(), s);
      } else {
        g_aout.run(h.get() + first, aout_w.get(), actions_f, aout_b.get(), s);
      }
    }
    mark("euler: norm + out gemm", s);
  }
  if (step_glue) glue(cfg.flow_steps);
  prefetcher.rejoin(s);
}

CudaDecoder::CudaDecoder(const ModelConfig& config, const RunShape& shape,
                         const WeightStore& weights, const CudaEngineOptions& options)
    : impl_(((void)cuda::kernel_handover(),  // a bad PI0_KERNEL_HANDOVER fails here, not later
             std::make_unique<Impl>(config, shape, weights, options))) {}
CudaDecoder::~CudaDecoder() = default;
CudaDecoder::CudaDecoder(CudaDecoder&&) noexcept = default;
CudaDecoder& CudaDecoder::operator=(CudaDecoder&&) noexcept = default;

void CudaDecoder::decode(Bf16* d_kv_slot, const Bf16* d_state, const Bf16* d_noise,
                         float* d_actions, cudaStream_t stream) {
  decode_batch(&d_kv_slot, 1, d_state, d_noise, d_actions, stream);
}

void CudaDecoder::decode_batch(Bf16* const* d_kv_slots, int count, const Bf16* d_state,
                               const Bf16* d_noise, float* d_actions, cudaStream_t stream,
                               const cuda::LayerWait* waits, const cuda::LayerWaitLimits* limits) {
  PI0_CHECK(impl_, "CudaDecoder used after move");
  PI0_CHECK(count >= 1 && count <= impl_->max_batch,
            "CudaDecoder::decode_batch: " + std::to_string(count) + " frames, at most " +
                std::to_string(impl_->max_batch) + " per pass");
  PI0_CHECK(d_kv_slots && d_state && d_noise && d_actions,
            "CudaDecoder::decode: null device pointer");
  PI0_CHECK(cuda::is_aligned(d_state, 16) && cuda::is_aligned(d_noise, 16) &&
                cuda::is_aligned(d_actions, 16),
            "CudaDecoder::decode: device buffers must be 16-byte aligned");
  PI0_CHECK(!waits || (limits && limits->timeout_ns > 0),
            "CudaDecoder::decode: layer waits need a deadline");
  std::vector<const void*> key{d_state, d_noise, d_actions, impl_->timer,
                               waits ? limits->error : nullptr};
  for (int f = 0; f < count; ++f) {
    PI0_CHECK(d_kv_slots[f] && cuda::is_aligned(d_kv_slots[f], 16),
              "CudaDecoder::decode: K/V slots must be non-null and 16-byte aligned");
    key.push_back(d_kv_slots[f]);
    if (waits) {
      PI0_CHECK(waits[f].counters && waits[f].expected,
                "CudaDecoder::decode: a layer wait needs counters and an expected generation");
      key.insert(key.end(), {waits[f].counters, waits[f].expected, waits[f].done_at});
    }
  }
  impl_->graphs.run(key, stream, [&](cudaStream_t s) {
    impl_->forward(d_kv_slots, count, d_state, d_noise, d_actions, waits, limits, s);
  });
}

std::vector<cuda::TunableGemm> CudaDecoder::tunable_gemms() {
  return impl_->tunables;
}
void CudaDecoder::forget_graphs() {
  impl_->graphs.clear();
}
int CudaDecoder::max_batch() const {
  return impl_->max_batch;
}
bool CudaDecoder::persistent_layers() const {
  return impl_->layers_kernel.valid();
}
std::string CudaDecoder::attention_kernels(int step) const {
  PI0_CHECK(step >= 0 && step < impl_->cfg.flow_steps,
            "CudaDecoder::attention_kernels: no flow step " + std::to_string(step));
  return cuda::attention_kernels_name(impl_->attention_for(step).kernels());
}
void CudaDecoder::set_op_timer(cuda::OpTimer* timer) {
  impl_->timer = timer;
  if (timer && impl_->layers_kernel.valid()) impl_->layers_kernel.enable_trace();
}
std::string CudaDecoder::layers_trace() const {
  return impl_->layers_kernel.trace_summary();
}
size_t CudaDecoder::weight_bytes() const {
  return impl_->memory.weight_bytes();
}
size_t CudaDecoder::workspace_bytes() const {
  return impl_->memory.workspace_bytes();
}
double CudaDecoder::flops() const {
  return impl_->flops;
}
double CudaDecoder::weight_bytes_read() const {
  return impl_->bytes_read;
}
const ModelConfig& CudaDecoder::config() const {
  return impl_->cfg;
}
const RunShape& CudaDecoder::shape() const {
  return impl_->shape;
}

}  // namespace pi0
