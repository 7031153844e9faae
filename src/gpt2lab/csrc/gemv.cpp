// Matrix-vector products for decoding on x86 CPUs with AVX-512: y = x @ W.T (* scale) (+ bias).
//
// Decoding reads every weight once per token, so its speed is the speed at which weights stream
// from memory. pack() lays W out for that: rows in groups of 4, the group's rows interleaved 64
// bytes at a time, so each thread reads its share of W as one sequential stream (prefetched into
// L2 ahead of use). Weights may be fp32, bf16 or int8 (with one scale per output row); each is
// widened to fp32 in registers and multiplied with fp32 activations.
//
// Every output element is one row of x against one row of W, summed in the same order whatever
// the number of rows M or threads: a row's result does not depend on the rows batched with it.

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>
#include <type_traits>
#include <torch/extension.h>

namespace {

constexpr int64_t kRows = 4;     // weight rows per group
constexpr int64_t kBytes = 64;   // bytes of each row per chunk (one cache line)
constexpr int64_t kAhead = 4096; // prefetch distance in the packed stream, bytes
constexpr int64_t kTile = 4;     // activation rows per register tile
constexpr int64_t kBlockBytes = 256 << 10;  // weights multiplied with all of x at a time

// 16 weights widened to fp32.
template <typename W> __m512 widen(const W* p);
template <> inline __m512 widen<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 widen<at::BFloat16>(const at::BFloat16* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
template <> inline __m512 widen<int8_t>(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// The outputs of group g: each accumulator's sum, times its row's scale, plus its bias.
template <int MT>
inline void store(const __m512 (&acc)[MT][kRows], int64_t g, int64_t N, const float* scale, const float* bias,
                  float* out) {
  for (int j = 0; j < kRows && g * kRows + j < N; j++) {
    const int64_t n = g * kRows + j;
    for (int m = 0; m < MT; m++) {
      float y = _mm512_reduce_add_ps(acc[m][j]);
      if (scale) y *= scale[n];
      if (bias) y += bias[n];
      out[m * N + n] = y;
    }
  }
}

// Rows [0, MT) of x (fp32, Kp wide) against groups [g0, g1) of packed W.
template <typename W, int MT>
void tile(const float* x, int64_t Kp, const W* w, int64_t g0, int64_t g1, int64_t N,
          const float* scale, const float* bias, float* out) {
  constexpr int64_t E = kBytes / sizeof(W);  // weights per row per chunk
  const int64_t chunks = Kp / E;
  for (int64_t g = g0; g < g1; g++) {
    __m512 acc[MT][kRows];
    for (int m = 0; m < MT; m++)
      for (int j = 0; j < kRows; j++) acc[m][j] = _mm512_setzero_ps();
    const W* wg = w + g * chunks * kRows * E;
    for (int64_t c = 0; c < chunks; c++) {
      const W* wc = wg + c * kRows * E;
      const char* ahead = reinterpret_cast<const char*>(wc) + kAhead;
      for (int j = 0; j < kRows; j++) _mm_prefetch(ahead + j * kBytes, _MM_HINT_T1);
      for (int64_t s = 0; s < E; s += 16) {
        __m512 wv[kRows];
        for (int j = 0; j < kRows; j++) wv[j] = widen<W>(wc + j * E + s);
        for (int m = 0; m < MT; m++) {
          __m512 xv = _mm512_loadu_ps(x + m * Kp + c * E + s);
          for (int j = 0; j < kRows; j++) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
        }
      }
    }
    store<MT>(acc, g, N, scale, bias, out);
  }
}

// bf16 weights against bf16 activations with AVX512-BF16's dot products (pairs of products
// summed into fp32): the same streaming, half the instructions of widening to fp32.
template <int MT>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void tile_dp(const at::BFloat16* x, int64_t Kp, const at::BFloat16* w, int64_t g0, int64_t g1, int64_t N,
             const float* scale, const float* bias, float* out) {
  constexpr int64_t E = kBytes / 2;
  const int64_t chunks = Kp / E;
  for (int64_t g = g0; g < g1; g++) {
    __m512 acc[MT][kRows];
    for (int m = 0; m < MT; m++)
      for (int j = 0; j < kRows; j++) acc[m][j] = _mm512_setzero_ps();
    const at::BFloat16* wg = w + g * chunks * kRows * E;
    for (int64_t c = 0; c < chunks; c++) {
      const at::BFloat16* wc = wg + c * kRows * E;
      const char* ahead = reinterpret_cast<const char*>(wc) + kAhead;
      for (int j = 0; j < kRows; j++) _mm_prefetch(ahead + j * kBytes, _MM_HINT_T1);
      __m512bh wv[kRows];
      for (int j = 0; j < kRows; j++) wv[j] = (__m512bh)_mm512_loadu_si512(wc + j * E);
      for (int m = 0; m < MT; m++) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * Kp + c * E);
        for (int j = 0; j < kRows; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, wv[j]);
      }
    }
    store<MT>(acc, g, N, scale, bias, out);
  }
}

// Rows [0, M) of x against groups [g0, g1): a block of groups small enough to stay in L2 is
// multiplied with every tile of x before the next block is read.
template <typename W, typename X>
void rows(const X* x, int64_t M, int64_t Kp, const W* w, int64_t g0, int64_t g1, int64_t N,
          const float* scale, const float* bias, float* out) {
  const int64_t block = std::max<int64_t>(1, kBlockBytes / (Kp * sizeof(W) * kRows));
  for (int64_t b = g0; b < g1; b += block) {
    const int64_t b1 = std::min(g1, b + block);
    for (int64_t m = 0; m < M; m += kTile) {
      const X* xm = x + m * Kp;
      float* om = out + m * N;
      if constexpr (std::is_same_v<X, at::BFloat16>) {
        switch (std::min(kTile, M - m)) {
          case 4: tile_dp<4>(xm, Kp, w, b, b1, N, scale, bias, om); break;
          case 3: tile_dp<3>(xm, Kp, w, b, b1, N, scale, bias, om); break;
          case 2: tile_dp<2>(xm, Kp, w, b, b1, N, scale, bias, om); break;
          default: tile_dp<1>(xm, Kp, w, b, b1, N, scale, bias, om);
        }
      } else {
        switch (std::min(kTile, M - m)) {
          case 4: tile<W, 4>(xm, Kp, w, b, b1, N, scale, bias, om); break;
          case 3: tile<W, 3>(xm, Kp, w, b, b1, N, scale, bias, om); break;
          case 2: tile<W, 2>(xm, Kp, w, b, b1, N, scale, bias, om); break;
          default: tile<W, 1>(xm, Kp, w, b, b1, N, scale, bias, om);
        }
      }
    }
  }
}

}  // namespace

// W (N, K) -> (ceil(N/4), Kp / E, 4, E) with E = 64 bytes of weights, zero-padded: written in
// place, row by row, so packing holds W and its packed copy and nothing else.
torch::Tensor pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack: a 2-d weight");
  const auto w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), size = w.element_size(), E = kBytes / size;
  const int64_t chunks = (K + E - 1) / E, groups = (N + kRows - 1) / kRows;
  auto packed = torch::zeros({groups, chunks, kRows, E}, w.options());
  const char* src = static_cast<const char*>(w.data_ptr());
  char* dst = static_cast<char*>(packed.data_ptr());
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++)
      for (int64_t c = 0; c < chunks; c++) {
        const int64_t len = std::min(E, K - c * E) * size;
        std::memcpy(dst + (((n / kRows) * chunks + c) * kRows + n % kRows) * kBytes,
                    src + (n * K + c * E) * size, len);
      }
  });
  return packed;
}

// x (M, K) fp32 or bf16; packed from pack(); returns (M, N) in x's dtype.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                     const c10::optional<torch::Tensor>& scale, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4, "linear: x (M, K) and a packed weight");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "linear: CPU tensors only");
  TORCH_CHECK(packed.is_contiguous() && packed.size(2) == kRows && packed.size(3) * packed.element_size() == kBytes,
              "linear: the weight is not in pack()'s layout (was it converted to another dtype after packing?)");
  const int64_t M = x.size(0), K = x.size(1), Kp = packed.size(1) * packed.size(3);
  TORCH_CHECK(K > 0 && K <= Kp && Kp - K < packed.size(3), "linear: x has ", K, " features, the weight ", Kp);
  TORCH_CHECK(N > 0 && packed.size(0) == (N + kRows - 1) / kRows, "linear: the weight does not have ", N, " rows");
  for (const auto* t : {&scale, &bias})
    TORCH_CHECK(!*t || ((*t)->scalar_type() == torch::kFloat && (*t)->is_contiguous() && (*t)->device().is_cpu() &&
                        (*t)->numel() == N),
                "linear: scale and bias must be float32 CPU tensors of ", N, " contiguous values");
  const auto dtype = packed.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16 || dtype == torch::kChar,
              "linear: weights must be float32, bfloat16 or int8");
  // bf16 times bf16 by dot products where the CPU has them; otherwise activations widened to fp32.
  static const bool has_dp = __builtin_cpu_supports("avx512bf16");
  const bool dp = has_dp && dtype == torch::kBFloat16 && x.scalar_type() == torch::kBFloat16;
  const auto xtype = dp ? torch::kBFloat16 : torch::kFloat;
  torch::Tensor xf = x;  // rows Kp wide in the kernel's activation type: x itself where it already is
  if (K != Kp || x.scalar_type() != xtype || !x.is_contiguous()) {
    xf = torch::zeros({M, Kp}, x.options().dtype(xtype));
    xf.narrow(1, 0, K).copy_(x);
  }
  auto out = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  const float* sp = scale ? scale->data_ptr<float>() : nullptr;
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  if (dp) {
    const at::BFloat16* xb = xf.data_ptr<at::BFloat16>();
    at::parallel_for(0, packed.size(0), 16, [&](int64_t g0, int64_t g1) {
      rows(xb, M, Kp, packed.data_ptr<at::BFloat16>(), g0, g1, N, sp, bp, op);
    });
    return out.to(torch::kBFloat16);
  }
  const float* xp = xf.data_ptr<float>();
  at::parallel_for(0, packed.size(0), 16, [&](int64_t g0, int64_t g1) {
    if (dtype == torch::kFloat) rows(xp, M, Kp, packed.data_ptr<float>(), g0, g1, N, sp, bp, op);
    else if (dtype == torch::kBFloat16) rows(xp, M, Kp, packed.data_ptr<at::BFloat16>(), g0, g1, N, sp, bp, op);
    else rows(xp, M, Kp, packed.data_ptr<int8_t>(), g0, g1, N, sp, bp, op);
  });
  return x.scalar_type() == torch::kFloat ? out : out.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "W (N, K) in the layout linear() streams");
  m.def("linear", &linear, "x @ W.T * scale + bias from a packed W");
}
