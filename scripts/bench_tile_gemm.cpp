// Single-thread GFLOP/s of one tile GEMM C (m x n) += A (m x k) · B (k x n), repeated: selfattn's
// float32 kernel (tile.h), its bf16 kernel (tile_bf16.h, B VNNI-packed) and oneDNN's brgemm through
// ATen (bf16 and f16 with VNNI-packed B, f16 and f32 without). Built and run by bench_tile_gemm.py.
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
#include <chrono>
#include "cpu/tile.h"
#include "cpu/tile_bf16.h"
using namespace selfattn::cpu;
using clk = std::chrono::steady_clock;
// returns GFLOP/s of C(m x n) = A(m x k) B(k x n), repeated
double bench(std::string kind, int64_t m, int64_t n, int64_t k, int64_t iters) {
  std::vector<float> a(m * k), b(k * n), c(m * n + 64);
  for (auto& x : a) x = (rand() % 100) / 100.f;
  for (auto& x : b) x = (rand() % 100) / 100.f;
  std::vector<uint32_t> b2(k / 2 * n + 16);
  std::vector<c10::BFloat16> ab(m * k), bb(k * n);
  std::vector<c10::Half> ah(m * k), bh(k * n);
  for (int64_t i = 0; i < m * k; ++i) { ab[i] = a[i]; ah[i] = a[i]; }
  for (int64_t i = 0; i < k * n; ++i) { bb[i] = b[i]; bh[i] = b[i]; }
  std::vector<c10::BFloat16> bv(k * n); std::vector<c10::Half> hv(k*n);
  for (int64_t p = 0; p < k; ++p) for (int64_t j = 0; j < n; ++j) { bv[(p/2)*2*n + 2*j + (p&1)] = bb[p*n+j]; hv[(p/2)*2*n + 2*j + (p&1)] = bh[p*n+j]; }
  std::memcpy(b2.data(), bv.data(), k * n * 2);
  auto run = [&]() {
    if (kind == "fp32") gemm<float>(m, n, k, a.data(), k, 1, b.data(), n, c.data(), n, true);
    else if (kind == "own") gemm_bf16(m, n, k / 2, reinterpret_cast<const uint16_t*>(ab.data()), k, 2, b2.data(), n, c.data(), n, 1.f, true);
    else if (kind == "brgemm_bf16") at::native::cpublas::brgemm(m, n, k, k, n, n, true, ab.data(), bv.data(), c.data(), true);
    else if (kind == "brgemm_f16") at::native::cpublas::brgemm(m, n, k, k, n, n, true, ah.data(), hv.data(), c.data(), true);
    else if (kind == "brgemm_f16_novnni") at::native::cpublas::brgemm(m, n, k, k, n, n, true, ah.data(), bh.data(), c.data(), false);
    else if (kind == "brgemm_f32") at::native::cpublas::brgemm(m, n, k, k, n, n, true, a.data(), b.data(), c.data(), false);
    else TORCH_CHECK(false, kind);
  };
  for (int i = 0; i < 20; ++i) run();
  auto t0 = clk::now();
  for (int64_t i = 0; i < iters; ++i) run();
  double s = std::chrono::duration<double>(clk::now() - t0).count();
  if (kind.rfind("brgemm", 0) == 0) at::native::cpublas::brgemm_release(kind != "brgemm_f32" && kind != "brgemm_f16_novnni");
  return 2.0 * m * n * k * iters / s / 1e9;
}
bool could_pack(std::string t) { return at::native::cpublas::could_pack(t == "bf16" ? at::kBFloat16 : at::kHalf); }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) { mod.def("bench", &bench); mod.def("could_pack", &could_pack); mod.def("has_bf16", &bf16_kernels_enabled); }
