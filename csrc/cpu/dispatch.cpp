// Which copy of the CPU kernels runs (capability.h): compiled once, for the x86-64 baseline.
//
// The choice follows ATen's own, at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY;
// SELFATTN_CPU_CAPABILITY (default, avx2 or avx512) overrides it for selfattn alone. Either way the
// copy is never one this build lacks or this CPU cannot run: the best one below is taken instead
// (ATen does not check ATEN_CPU_CAPABILITY against the CPU). Decided on the first kernel call;
// torch.ops.selfattn._cpu_capability reports it and, for tests, changes it.
#include "../attention.h"
#include "blocking.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>

#define SELFATTN_CPU_NS cpu_default
#include "kernels.h"
#undef SELFATTN_CPU_NS
#ifdef SELFATTN_CPU_HAS_AVX2
#define SELFATTN_CPU_NS cpu_avx2
#include "kernels.h"
#undef SELFATTN_CPU_NS
#endif
#ifdef SELFATTN_CPU_HAS_AVX512
#define SELFATTN_CPU_NS cpu_avx512
#include "kernels.h"
#undef SELFATTN_CPU_NS
#endif

namespace selfattn {
namespace {

// One variant's entry points (kernels.h).
struct CpuKernels {
  decltype(&cpu_default::attention_forward) attention_forward;
  decltype(&cpu_default::attention_backward) attention_backward;
  decltype(&cpu_default::attention_jvp) attention_jvp;
  decltype(&cpu_default::bf16_tile_gemm) bf16_tile_gemm;
};
#define SELFATTN_CPU_KERNELS(ns) \
  CpuKernels { &ns::attention_forward, &ns::attention_backward, &ns::attention_jvp, &ns::bf16_tile_gemm }

enum Capability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kCount = 3 };
constexpr const char* kNames[kCount] = {"DEFAULT", "AVX2", "AVX512"};

// nullptr where this build has no such copy.
const CpuKernels* compiled_kernels(int capability) {
  static const CpuKernels kDefaultKernels = SELFATTN_CPU_KERNELS(cpu_default);
#ifdef SELFATTN_CPU_HAS_AVX2
  static const CpuKernels kAvx2Kernels = SELFATTN_CPU_KERNELS(cpu_avx2);
#endif
#ifdef SELFATTN_CPU_HAS_AVX512
  static const CpuKernels kAvx512Kernels = SELFATTN_CPU_KERNELS(cpu_avx512);
#endif
  switch (capability) {
#ifdef SELFATTN_CPU_HAS_AVX2
    case kAvx2:
      return &kAvx2Kernels;
#endif
#ifdef SELFATTN_CPU_HAS_AVX512
    case kAvx512:
      return &kAvx512Kernels;
#endif
    case kDefault:
      return &kDefaultKernels;
    default:
      return nullptr;
  }
}

// Whether this CPU (and OS: libgcc checks that it saves the vector registers) has every
// instruction set the copy is compiled with (selfattn/_settings.py: CAPABILITY_FLAGS).
bool cpu_can_run(int capability) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  switch (capability) {
    case kAvx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case kAvx2:
      return avx2;
    default:
      return capability == kDefault;
  }
#else
  return capability == kDefault;
#endif
}

bool usable(int capability) { return compiled_kernels(capability) != nullptr && cpu_can_run(capability); }

std::string usable_names() {
  std::string names;
  for (int c = 0; c < kCount; ++c) {
    if (usable(c)) {
      names += (names.empty() ? "" : ", ") + std::string(kNames[c]);
    }
  }
  return names;
}

// "avx2" -> kAvx2, case-insensitive; ATen's "NO AVX" is DEFAULT. -1 if none.
int parse(std::string name) {
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) { return std::toupper(ch); });
  if (name == "NO AVX") {
    return kDefault;
  }
  for (int c = 0; c < kCount; ++c) {
    if (name == kNames[c]) {
      return c;
    }
  }
  return -1;
}

int automatic_choice() {
  int wanted = kDefault;
#if defined(__x86_64__) || defined(__i386__)  // ATen's capabilities mean other things elsewhere
  wanted = std::max(parse(at::get_cpu_capability()), 0);
#endif
  const char* override_env = std::getenv("SELFATTN_CPU_CAPABILITY");
  const bool overridden = override_env != nullptr && *override_env != '\0';
  if (overridden) {
    const int asked = parse(override_env);
    if (asked < 0) {
      TORCH_WARN("selfattn: ignoring SELFATTN_CPU_CAPABILITY=", override_env, ": expected default, avx2 or avx512");
    } else {
      wanted = asked;
    }
  }
  int chosen = wanted;
  while (chosen > kDefault && !usable(chosen)) {
    --chosen;
  }
  if (chosen != wanted) {
    TORCH_WARN("selfattn: ", overridden ? "SELFATTN_CPU_CAPABILITY" : "ATen", " asks for the ", kNames[wanted],
               " kernels, which ", compiled_kernels(wanted) ? "this CPU cannot run" : "this build lacks", "; using ",
               kNames[chosen]);
  }
  return chosen;
}

std::atomic<int> chosen_capability{-1};

int current_capability() {
  int capability = chosen_capability.load(std::memory_order_acquire);
  if (capability < 0) {  // two threads may both decide here; they decide the same
    capability = automatic_choice();
    chosen_capability.store(capability, std::memory_order_release);
  }
  return capability;
}

const CpuKernels& kernels() { return *compiled_kernels(current_capability()); }

}  // namespace

std::string cpu_capability(std::string capability) {
  if (capability == "auto") {
    chosen_capability.store(automatic_choice(), std::memory_order_release);
  } else if (!capability.empty()) {
    const int asked = parse(capability);
    TORCH_CHECK(asked >= 0, "_cpu_capability: capability must be auto, default, avx2 or avx512, got '", capability,
                "'");
    TORCH_CHECK(compiled_kernels(asked) != nullptr, "_cpu_capability: this build has no ", kNames[asked],
                " kernels (usable here: ", usable_names(), ")");
    TORCH_CHECK(cpu_can_run(asked), "_cpu_capability: this CPU lacks the instructions of the ", kNames[asked],
                " kernels (usable here: ", usable_names(), ")");
    chosen_capability.store(asked, std::memory_order_release);
  }
  return kNames[current_capability()];
}

std::string bf16_tile_gemm() { return kernels().bf16_tile_gemm(); }

std::string cpu_blocking() { return describe_cpu_blocking(current_capability() == kAvx512 ? 16 : 8); }

void attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask,
                           double scale, const at::Tensor& out, const at::Tensor& lse) {
  kernels().attention_forward(q, k, v, mask, scale, out, lse);
}

void attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& lse, const AttentionMask& mask, double scale,
                            const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v) {
  kernels().attention_backward(grad_out, q, k, v, out, lse, mask, scale, grad_q, grad_k, grad_v);
}

void attention_jvp_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tangent_q,
                       const at::Tensor& tangent_k, const at::Tensor& tangent_v, const AttentionMask& mask,
                       double scale, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& tangent_out) {
  kernels().attention_jvp(q, k, v, tangent_q, tangent_k, tangent_v, mask, scale, out, lse, tangent_out);
}

}  // namespace selfattn
