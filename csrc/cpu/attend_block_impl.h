// The body of the CPU decode kernel's inner loop, compiled once per instruction set: each
// attend_block_<isa>.cpp sets `#pragma GCC target(...)` and TORCH_CP_ISA_FN, then includes this file.
// See [Note: CPU decode kernel] in attend_block.h.
// NOLINT(build/header_guard): included once per translation unit on purpose.


namespace torch_cp {
namespace {

#define TORCH_CP_INLINE inline __attribute__((always_inline))

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

TORCH_CP_INLINE float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// [Note: vectorisable exp]
// exp(x) = 2^n · exp(r), n = round(x / ln 2), |r| <= ln2 / 2, exp(r) by a degree-7 Taylor polynomial
// (relative error < 2e-8 before rounding, so about 1 ulp in float32). Inputs below -87.3
// (including -inf, a masked score) give exactly 0; inputs here are always <= 0.
TORCH_CP_INLINE float exp_nonpositive(float x) {
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(std::max(n, -126.f)) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.f : p * scale;
}

// One register of floats for the instruction set of this build (64 bytes for AVX-512, 32 for AVX2,
// 16 for the baseline), so the accumulators below fit the register file without spilling.
#ifndef TORCH_CP_VEC_BYTES
#define TORCH_CP_VEC_BYTES 16
#endif
typedef float Vec __attribute__((vector_size(TORCH_CP_VEC_BYTES)));
constexpr int kLanes = TORCH_CP_VEC_BYTES / sizeof(float);

TORCH_CP_INLINE Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

TORCH_CP_INLINE float hsum(Vec v) {
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += v[j];
  return s;
}

// Scores of kRows query rows against two keys at once: 2·kRows independent accumulator chains
// keep the FMA units busy (a single dot product is bound by its add latency).
template <int kRows>
TORCH_CP_INLINE void dots_2keys(const float* q, int64_t dim, const float* k0, const float* k1, float* s0, float* s1) {
  Vec acc0[kRows] = {}, acc1[kRows] = {};
  for (int64_t d0 = 0; d0 < dim; d0 += kLanes) {
    const Vec x0 = load_vec(k0 + d0), x1 = load_vec(k1 + d0);
    for (int r = 0; r < kRows; ++r) {
      const Vec qr = load_vec(q + r * dim + d0);
      acc0[r] += qr * x0;
      acc1[r] += qr * x1;
    }
  }
  for (int r = 0; r < kRows; ++r) {
    s0[r] = hsum(acc0[r]);
    s1[r] = hsum(acc1[r]);
  }
}

// scores[r * n_keys + t] for a pair of keys (k1 may equal k0 for an odd tail).
TORCH_CP_INLINE void score_pair(const TileArgs& a, int64_t t, const float* k0, const float* k1, float* scores) {
  float s0[4], s1[4];
  int64_t r = 0;
  for (; r + 4 <= a.rows; r += 4) {
    dots_2keys<4>(a.q + r * a.dim, a.dim, k0, k1, s0, s1);
    for (int i = 0; i < 4; ++i) {
      scores[(r + i) * a.n_keys + t] = s0[i];
      if (t + 1 < a.n_keys) scores[(r + i) * a.n_keys + t + 1] = s1[i];
    }
  }
  for (; r < a.rows; ++r) {
    dots_2keys<1>(a.q + r * a.dim, a.dim, k0, k1, s0, s1);
    scores[r * a.n_keys + t] = s0[0];
    if (t + 1 < a.n_keys) scores[r * a.n_keys + t + 1] = s1[0];
  }
}

TORCH_CP_INLINE void compute_scores(const TileArgs& a, float* scores) {
  if (a.dim % kLanes == 0) {
    for (int64_t t = 0; t < a.n_keys; t += 2) {
      const float* k0 = a.k + t * a.ld_k;
      score_pair(a, t, k0, t + 1 < a.n_keys ? k0 + a.ld_k : k0, scores);
    }
  } else {
    for (int64_t t = 0; t < a.n_keys; ++t) {
      const float* k = a.k + t * a.ld_k;
      for (int64_t r = 0; r < a.rows; ++r) scores[r * a.n_keys + t] = dot(a.q + r * a.dim, k, a.dim);
    }
  }
  const int64_t n = a.rows * a.n_keys;
  if (a.softcap > 0.f) {
    for (int64_t i = 0; i < n; ++i) scores[i] = a.softcap * std::tanh(scores[i] / a.softcap);
  }
  if (a.bias != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) scores[i] += a.bias[i];
  }
}

// Turns one row of scores into probabilities relative to the new running max; returns the
// factor that rescales the row's previous sum and accumulator.
TORCH_CP_INLINE float softmax_row(float* s, int64_t n, float& m, float& l) {
  float tile_max = kNegInf;
  for (int64_t t = 0; t < n; ++t) tile_max = std::max(tile_max, s[t]);
  const float m_new = std::max(m, tile_max);
  if (m_new == kNegInf) {  // everything so far is masked: no contribution
    for (int64_t t = 0; t < n; ++t) s[t] = 0.f;
    return 1.f;
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) {
    s[t] = exp_nonpositive(s[t] - m_new);
    sum += s[t];
  }
  const float corr = m == kNegInf ? 0.f : std::exp(m - m_new);
  l = l * corr + sum;
  m = m_new;
  return corr;
}

// acc[r, d0:d0+kLanes*kChunks] += sum_t p[r, t] * v[t, d0:...] for kRows rows: the accumulators stay in
// registers for the whole tile (kRows*kChunks independent FMA chains), so acc is loaded and stored
// once per tile instead of once per key.
template <int kRows, int kChunks>
TORCH_CP_INLINE void pv_block(const float* p, int64_t n, const float* v, int64_t ld_v, int64_t d0, float* acc,
                              int64_t dim) {
  Vec a[kRows][kChunks];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kChunks; ++c) a[r][c] = load_vec(acc + r * dim + d0 + kLanes * c);
  for (int64_t t = 0; t < n; ++t) {
    Vec x[kChunks];
    for (int c = 0; c < kChunks; ++c) x[c] = load_vec(v + t * ld_v + d0 + kLanes * c);
    for (int r = 0; r < kRows; ++r) {
      const float pr = p[r * n + t];
      for (int c = 0; c < kChunks; ++c) a[r][c] += pr * x[c];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kChunks; ++c) std::memcpy(acc + r * dim + d0 + kLanes * c, &a[r][c], sizeof(Vec));
}

template <int kRows>
TORCH_CP_INLINE void pv_rows(const TileArgs& a, const float* p, float* acc) {
  int64_t d0 = 0;
  for (; d0 + 2 * kLanes <= a.dim; d0 += 2 * kLanes) pv_block<kRows, 2>(p, a.n_keys, a.v, a.ld_v, d0, acc, a.dim);
  if (d0 < a.dim) pv_block<kRows, 1>(p, a.n_keys, a.v, a.ld_v, d0, acc, a.dim);
}

// acc += P V for head dims that are a multiple of kLanes.
TORCH_CP_INLINE void accumulate_pv(const TileArgs& a, const float* scores, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= a.rows; r += 4) pv_rows<4>(a, scores + r * a.n_keys, acc + r * a.dim);
  for (; r < a.rows; ++r) pv_rows<1>(a, scores + r * a.n_keys, acc + r * a.dim);
}

}  // namespace

void TORCH_CP_ISA_FN(const TileArgs& a, float* scores, float* m, float* l, float* acc) {
  compute_scores(a, scores);
  for (int64_t r = 0; r < a.rows; ++r) {
    const float corr = softmax_row(scores + r * a.n_keys, a.n_keys, m[r], l[r]);
    if (corr != 1.f) {
      float* row = acc + r * a.dim;
#pragma omp simd
      for (int64_t d = 0; d < a.dim; ++d) row[d] *= corr;
    }
  }
  if (a.dim % kLanes == 0) {
    accumulate_pv(a, scores, acc);
    return;
  }
  for (int64_t t = 0; t < a.n_keys; ++t) {
    const float* v = a.v + t * a.ld_v;
    for (int64_t r = 0; r < a.rows; ++r) {
      const float p = scores[r * a.n_keys + t];
      if (p == 0.f) continue;
      float* row = acc + r * a.dim;
#pragma omp simd
      for (int64_t d = 0; d < a.dim; ++d) row[d] += p * v[d];
    }
  }
}

}  // namespace torch_cp
