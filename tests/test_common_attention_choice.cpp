// Which kernels a multi-query attention runs by default, and how the PI0_*_ATTENTION overrides
// are read (pi0/cuda/attention.hpp). The kernels themselves are checked on the GPU.
#include <cstdlib>
#include <string>

#include "catch.hpp"
#include "pi0/check.hpp"
#include "pi0/config.hpp"
#include "pi0/cuda/attention.hpp"
#include "scoped_env.hpp"

using pi0::cuda::attention_kernels_from_env;
using pi0::cuda::AttentionKernels;
using pi0::cuda::default_attention_kernels;

TEST_CASE("attention: the tiled kernels only for decoder-sized attentions over unaligned keys",
          "[attention]") {
  // The decoder: 64 or 51 tokens x 8 heads against E + C + 1 keys.
  CHECK(default_attention_kernels(64 * 8, 576) == AttentionKernels::kGemms);  // V=2 C=63
  CHECK(default_attention_kernels(51 * 8, 563) == AttentionKernels::kTiled);  // V=2 C=50
  CHECK(default_attention_kernels(51 * 8, 583) == AttentionKernels::kTiled);  // V=2 C=50 P=20
  CHECK(default_attention_kernels(56 * 8, 568) == AttentionKernels::kGemms);  // a multiple of 8
  // The Gemma prefix attends to itself: 532 x 8 query rows are too many for the tiled kernels.
  CHECK(default_attention_kernels(532 * 8, 532) == AttentionKernels::kGemms);
  CHECK(default_attention_kernels(533 * 8, 533) == AttentionKernels::kGemms);
}

TEST_CASE("attention: the decoder's later steps on the wgmma kernel where the GEMMs would run",
          "[attention]") {
  using pi0::cuda::default_decoder_attention_kernels;
  CHECK(default_decoder_attention_kernels(64 * 8, 576, 256) == AttentionKernels::kWgmma);  // V=2
  CHECK(default_decoder_attention_kernels(64 * 8, 832, 256) == AttentionKernels::kWgmma);  // V=3
  CHECK(default_decoder_attention_kernels(51 * 8, 583, 256) == AttentionKernels::kTiled);  // C=50
  // Unaligned keys with too many query rows for the tiled kernels: the wgmma kernel, not the GEMMs.
  CHECK(default_decoder_attention_kernels(129 * 8, 583, 256) == AttentionKernels::kWgmma);
  // Other head sizes (the tiny test config) keep the GEMMs: the kernel is for 256 only.
  CHECK(default_decoder_attention_kernels(64 * 8, 576, 64) == AttentionKernels::kGemms);
}

TEST_CASE("attention: PI0_*_ATTENTION overrides the default, and a bad value is named",
          "[attention]") {
  constexpr const char* kVariable = "PI0_TEST_ATTENTION_CHOICE";
  ::unsetenv(kVariable);
  CHECK(attention_kernels_from_env(kVariable, AttentionKernels::kTiled) ==
        AttentionKernels::kTiled);
  ::setenv(kVariable, "", 1);
  CHECK(attention_kernels_from_env(kVariable, AttentionKernels::kGemms) ==
        AttentionKernels::kGemms);
  ::setenv(kVariable, "gemm", 1);
  CHECK(attention_kernels_from_env(kVariable, AttentionKernels::kTiled) ==
        AttentionKernels::kGemms);
  ::setenv(kVariable, "fused", 1);
  CHECK(attention_kernels_from_env(kVariable, AttentionKernels::kGemms) ==
        AttentionKernels::kFused);
  ::setenv(kVariable, "tiled", 1);
  CHECK(attention_kernels_from_env(kVariable, AttentionKernels::kGemms) ==
        AttentionKernels::kTiled);
  ::setenv(kVariable, "flash", 1);
  try {
    (void)attention_kernels_from_env(kVariable, AttentionKernels::kGemms);
    FAIL("accepted");
  } catch (const pi0::Error& e) {
    CHECK(std::string(e.what()).find("PI0_TEST_ATTENTION_CHOICE=flash") != std::string::npos);
  }
  // SigLIP's attention has no tiled kernels: its variable accepts gemm and fused only.
  const auto gemm_or_fused = {AttentionKernels::kGemms, AttentionKernels::kFused};
  ::setenv(kVariable, "fused", 1);
  CHECK(attention_kernels_from_env(kVariable, AttentionKernels::kGemms, gemm_or_fused) ==
        AttentionKernels::kFused);
  ::setenv(kVariable, "tiled", 1);
  try {
    (void)attention_kernels_from_env(kVariable, AttentionKernels::kFused, gemm_or_fused);
    FAIL("accepted");
  } catch (const pi0::Error& e) {
    CHECK(std::string(e.what()) == "PI0_TEST_ATTENTION_CHOICE=tiled: expected gemm or fused");
  }
  ::unsetenv(kVariable);
}

// The PI0_* on/off knobs (PI0_LAYER_WAITS, PI0_DECODER_PREFETCH, ...): "off" or "true" must not be
// read as one or the other by its first character.
TEST_CASE("an on/off knob takes 0 or 1 and names itself otherwise", "[attention]") {
  const char* name = "PI0_TEST_SWITCH";
  {
    const pi0::test::ScopedEnv unset(name, nullptr);
    CHECK(pi0::env_switch(name, true));
    CHECK_FALSE(pi0::env_switch(name, false));
  }
  {
    const pi0::test::ScopedEnv empty(name, "");
    CHECK(pi0::env_switch(name, true));
  }
  {
    const pi0::test::ScopedEnv on(name, "1");
    CHECK(pi0::env_switch(name, false));
  }
  {
    const pi0::test::ScopedEnv off(name, "0");
    CHECK_FALSE(pi0::env_switch(name, true));
  }
  for (const char* bad : {"off", "true", "00", "10", "1 ", "yes"}) {
    const pi0::test::ScopedEnv set(name, bad);
    try {
      (void)pi0::env_switch(name, true);
      FAIL("no error for '" << bad << "'");
    } catch (const pi0::Error& e) {
      CHECK(std::string(e.what()) ==
            std::string("PI0_TEST_SWITCH must be 0 or 1, not '") + bad + "'");
    }
  }
}

TEST_CASE("a numeric knob takes a whole number in its range and names itself otherwise",
          "[attention]") {
  const char* name = "PI0_TEST_NUMBER";
  {
    const pi0::test::ScopedEnv unset(name, nullptr);
    CHECK(pi0::env_integer(name, 0, 100, 7) == 7);
  }
  {
    const pi0::test::ScopedEnv set(name, "100");
    CHECK(pi0::env_integer(name, 0, 100, 7) == 100);
  }
  // strtol skips any leading white space, not only blanks: "\n5" is refused as " 5" is.
  for (const char* bad : {"20s", "abc", "101", "-1", " 5", "+5", "99999999999999999999", "\n5",
                          "\r5", "\v5", "\f5", "- 5"}) {
    const pi0::test::ScopedEnv set(name, bad);
    try {
      (void)pi0::env_integer(name, 0, 100, 7);
      FAIL("no error for '" << bad << "'");
    } catch (const pi0::Error& e) {
      CHECK(std::string(e.what()) ==
            std::string("PI0_TEST_NUMBER must be a whole number from 0 to 100, not '") + bad + "'");
    }
  }
}
