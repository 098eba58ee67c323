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
// The reduction r = x - n·ln2 (ln2 split in two for precision) and the polynomial for exp(r), for a
// float or a vector of them.
template <typename T>
TORCH_CP_INLINE T exp_reduced(T x, T n) {
  const T r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  T p = T{} + 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  return p * r + 1.f;
}

TORCH_CP_INLINE float exp_nonpositive(float x) {
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float p = exp_reduced(x, n);
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

// [Note: transposed reduction]
// A score is a dot product over the head dim, accumulated in kLanes-wide vectors that must be
// summed across their lanes at the end. Summing each vector on its own (a chain of lane extracts
// and adds) cost far more than the multiply-adds: 16 dot products of dim 128 are 128 FMAs but
// ~500 instructions of horizontal sums. Instead kAcc accumulators (rows x keys) are summed
// together, like a transpose: each level folds pairs of vectors (the two halves of every segment
// added, two shuffles and an add per pair) until every lane holds one full sum — 15 folds for 16
// vectors of 16 lanes. LaneOrder works out at compile time which accumulator each lane ends up
// holding.
constexpr int kAcc = kLanes >= 16 ? 16 : 8;  // accumulators per score block: fits 32 (16) registers

template <int B>
constexpr int fold_index(int j, bool high) {
  const int k = j / B, o = j % B;
  return (k % 2 ? kLanes : 0) + (k / 2) * 2 * B + o + (high ? B : 0);
}

// Lane j of the result, in block k = j / B of B lanes: the halves of segment k / 2 (2B lanes) of
// `a` (k even) or `b` (k odd), added.
template <int B, int... I>
TORCH_CP_INLINE Vec fold(Vec a, Vec b, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(a, b, fold_index<B>(I, false)...) +
         __builtin_shufflevector(a, b, fold_index<B>(I, true)...);
}

template <int B, int kCount>
TORCH_CP_INLINE void fold_levels(Vec* v) {
  if constexpr (B >= 1 && kCount > 1) {
    for (int i = 0; i < kCount / 2; ++i) v[i] = fold<B>(v[2 * i], v[2 * i + 1], std::make_integer_sequence<int, kLanes>{});
    fold_levels<B / 2, kCount / 2>(v);
  }
}

// source[i]: which of the kN input vectors the i-th output lane sums (mirrors fold_levels).
template <int kN>
struct LaneOrder {
  int source[kN];
  constexpr LaneOrder() : source() {
    int ids[kN][kLanes] = {};
    for (int i = 0; i < kN; ++i) ids[i][0] = i;
    int count = kN;
    for (int b = kLanes / 2; b >= 1 && count > 1; b /= 2) {
      for (int i = 0; i < count / 2; ++i) {
        int merged[kLanes] = {};
        for (int seg = 0; seg < kLanes / b; ++seg) merged[seg] = ids[2 * i + seg % 2][seg / 2];
        for (int seg = 0; seg < kLanes; ++seg) ids[i][seg] = merged[seg];
      }
      count /= 2;
    }
    for (int i = 0; i < kN; ++i) source[i] = ids[i / kLanes][i % kLanes];
  }
};

// sums[i] = the sum of the lanes of v[i], for kN vectors (v is overwritten).
template <int kN>
TORCH_CP_INLINE void sum_lanes(Vec (&v)[kN], float* sums) {
  static_assert(kN % kLanes == 0, "sum_lanes needs at least kLanes vectors");
  static constexpr LaneOrder<kN> order;
  fold_levels<kLanes / 2, kN>(v);
  float lanes[kN];
  std::memcpy(lanes, v, sizeof(lanes));
  for (int i = 0; i < kN; ++i) sums[order.source[i]] = lanes[i];
}

// Scores of query rows r0..r0+kRows against keys t0..t0+kKeys (kRows * kKeys = kAcc accumulator
// chains, independent, so the FMA units stay busy); keys past the tile's end repeat the last one
// and are not stored.
template <int kRows>
TORCH_CP_INLINE void score_block(const TileArgs& a, int64_t r0, int64_t t0, float* scores) {
  constexpr int kKeys = kAcc / kRows;
  const float* keys[kKeys];
  for (int j = 0; j < kKeys; ++j) keys[j] = a.k + std::min<int64_t>(t0 + j, a.n_keys - 1) * a.ld_k;
  const float* q = a.q + r0 * a.dim;
  Vec acc[kAcc] = {};
  for (int64_t d0 = 0; d0 < a.dim; d0 += kLanes) {
    Vec x[kKeys];
    for (int j = 0; j < kKeys; ++j) x[j] = load_vec(keys[j] + d0);
    for (int r = 0; r < kRows; ++r) {
      const Vec qr = load_vec(q + r * a.dim + d0);
      for (int j = 0; j < kKeys; ++j) acc[r * kKeys + j] += qr * x[j];
    }
  }
  float sums[kAcc];
  sum_lanes(acc, sums);
  const int64_t n = std::min<int64_t>(kKeys, a.n_keys - t0);
  for (int r = 0; r < kRows; ++r)
    for (int64_t j = 0; j < n; ++j) scores[(r0 + r) * a.n_keys + t0 + j] = sums[r * kKeys + j];
}

template <int kRows>
TORCH_CP_INLINE void score_rows(const TileArgs& a, int64_t r0, float* scores) {
  for (int64_t t0 = 0; t0 < a.n_keys; t0 += kAcc / kRows) score_block<kRows>(a, r0, t0, scores);
}

TORCH_CP_INLINE void compute_scores(const TileArgs& a, float* scores) {
  if (a.dim % kLanes == 0) {
    int64_t r = 0;
    for (; r + 4 <= a.rows; r += 4) score_rows<4>(a, r, scores);
    for (; r + 2 <= a.rows; r += 2) score_rows<2>(a, r, scores);
    for (; r < a.rows; ++r) score_rows<1>(a, r, scores);
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
  if (a.bias != nullptr) {  // -inf selects, not adds: a hidden NaN or +inf score must not become NaN
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) scores[i] = a.bias[i] == kNegInf ? kNegInf : scores[i] + a.bias[i];
  }
}

// Lane-wise helpers for the softmax of a row.
typedef int32_t IVec __attribute__((vector_size(TORCH_CP_VEC_BYTES)));

TORCH_CP_INLINE Vec splat(float x) { return Vec{} + x; }
TORCH_CP_INLINE void store_vec(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// Lane j of the result: lane (j + H) % kLanes of v.
template <int H, int... I>
TORCH_CP_INLINE Vec rotate(Vec v, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(v, v, ((I + H) % kLanes)...);
}

template <int H = kLanes / 2>
TORCH_CP_INLINE float max_lanes(Vec v) {
  if constexpr (H == 0) {
    return v[0];
  } else {
    const Vec w = rotate<H>(v, std::make_integer_sequence<int, kLanes>{});
    return max_lanes<H / 2>(v > w ? v : w);
  }
}

template <int H = kLanes / 2>
TORCH_CP_INLINE float add_lanes(Vec v) {
  if constexpr (H == 0) {
    return v[0];
  } else {
    return add_lanes<H / 2>(v + rotate<H>(v, std::make_integer_sequence<int, kLanes>{}));
  }
}

// exp_nonpositive on every lane (see [Note: vectorisable exp]); n = round(x / ln 2) by the
// 1.5·2^23 trick, whose low mantissa bits then hold n as an integer.
TORCH_CP_INLINE Vec exp_vec(Vec x) {
  constexpr float kMagic = 12582912.f;  // 1.5 * 2^23
  const Vec t = x * 1.44269504088896341f + kMagic;
  const Vec p = exp_reduced(x, t - kMagic);
  const IVec bits = ((IVec)t - (IVec)splat(kMagic) + 127) << 23;
  return x < -87.3f ? splat(0.f) : p * (Vec)bits;
}

// The largest score of a row of n, and whether any is NaN or +inf (see [Note: NaN rows]).
TORCH_CP_INLINE float row_max(const float* s, int64_t n, bool& bad) {
  constexpr float kMax = std::numeric_limits<float>::max();
  if (n % kLanes != 0) {
    float mx = kNegInf;
    for (int64_t t = 0; t < n; ++t) {
      mx = std::max(mx, s[t]);
      bad = bad || !(s[t] <= kMax);
    }
    return mx;
  }
  Vec mx = load_vec(s);
  IVec nonfinite = ~(mx <= kMax);
  for (int64_t t = kLanes; t < n; t += kLanes) {
    const Vec x = load_vec(s + t);
    mx = mx > x ? mx : x;
    nonfinite |= ~(x <= kMax);
  }
  int32_t lanes[kLanes];
  std::memcpy(lanes, &nonfinite, sizeof(lanes));
  for (int i = 0; i < kLanes; ++i) bad = bad || lanes[i] != 0;
  return max_lanes(mx);
}

// [Note: NaN rows]
// A NaN or +inf score (NaN in q or in a visible key, +inf in a key) makes its row NaN, as in SDPA:
// the row's m and l become NaN and stay so (later tiles add nothing), its accumulator is multiplied
// by NaN, so the row ends with out = NaN and lse = NaN, which the merges propagate. -inf scores are
// masked keys (hidden keys are set to -inf, never added to, so a hidden NaN stays hidden).

// Turns one row of scores into probabilities relative to the new running max; returns the
// factor that rescales the row's previous sum and accumulator (NaN when the row became NaN).
TORCH_CP_INLINE float softmax_row(float* s, int64_t n, float& m, float& l) {
  const bool whole = n % kLanes == 0;
  bool bad = m != m;  // already a NaN row
  const float tile_max = row_max(s, n, bad);
  if (bad) {
    for (int64_t t = 0; t < n; ++t) s[t] = 0.f;
    const bool was_nan = m != m;
    m = l = std::numeric_limits<float>::quiet_NaN();
    return was_nan ? 1.f : m;
  }
  const float m_new = std::max(m, tile_max);
  if (m_new == kNegInf) {  // everything so far is masked: no contribution
    for (int64_t t = 0; t < n; ++t) s[t] = 0.f;
    return 1.f;
  }
  float sum = 0.f;
  if (whole) {
    Vec acc = {};
    const Vec mv = splat(m_new);
    for (int64_t t = 0; t < n; t += kLanes) {
      const Vec e = exp_vec(load_vec(s + t) - mv);
      store_vec(s + t, e);
      acc += e;
    }
    sum = add_lanes(acc);
  } else {
    for (int64_t t = 0; t < n; ++t) {
      s[t] = exp_nonpositive(s[t] - m_new);
      sum += s[t];
    }
  }
  // exp_nonpositive(-inf) is 0: a row that had seen only masked keys restarts from this tile
  const float corr = m_new == m ? 1.f : exp_nonpositive(m - m_new);
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
  constexpr int kWide = kAcc / 4;  // value chunks per pass: kRows * kWide accumulators
  int64_t d0 = 0;
  for (; d0 + kWide * kLanes <= a.dim; d0 += kWide * kLanes)
    pv_block<kRows, kWide>(p, a.n_keys, a.v, a.ld_v, d0, acc, a.dim);
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
