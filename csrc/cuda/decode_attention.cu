// Split-KV decode attention with log-sum-exp on CUDA: the CUDA kernel of torch_cp::decode_attention.
// Same semantics as csrc/cpu/decode_attention.cpp; positions follow [Note: key and query positions]
// in torch_cp/reference.py. The splits are merged by the op torch_cp::merge_states (merge_states.cu).
//
// [Note: CUDA decode kernel]
// One block of 128 threads per (batch row b, KV head h, key split, block of R query rows); the rows
// are the G = Hq/Hkv heads of the GQA group times the Sq queries (R = 4, 8 or 16, more rows use more
// blocks), so each key and value row is read from memory once for the whole group.
// Keys stream through shared memory in tiles of KT = 32·KB keys, double-buffered with cp.async
// 16-byte copies (__pipeline_memcpy_async), so the next tile is in flight while one is computed:
//  1. scores: warp w owns rows [w·R/4, (w+1)·R/4), lane l owns keys l + 32j; q (float, pre-scaled
//     by scale·log2 e) is read from shared memory as a broadcast. Each warp then runs the online
//     softmax of its rows (max and sum by warp shuffles) and writes P to shared memory.
//  2. P·V: thread (g, c) owns 4 columns of D for all R rows and the keys g, g + n_groups, ...;
//     before each tile its accumulators are rescaled by the rows' correction factors.
// At the end the key groups' accumulators are summed in shared memory and divided by the sum.
// Scores are in base 2 inside the kernel; lse is stored natural: lse = (m₂ + log2 l)·ln 2.
// Rows with no visible key keep m = -inf and are stored as out = 0, lse = -inf, never NaN; rows with a
// NaN or +inf score of a visible key are stored as out = NaN, lse = NaN (see scores_softmax).
// attn_mask (bool, or float32 added to the scores; -inf hides) is read through the strides of its
// expansion to [B, Hq, Sq, L]. With a mask, is_causal or window, the block votes on each tile before
// copying it (tile_visible) and skips a tile that none of its rows sees, never reading its keys and
// values; the host also cuts each row's keys after the last one the mask shows (trim_to_mask), so a
// static cache's hidden tail gives no split any work (see [Note: skipping hidden tiles] in
// csrc/cpu/decode_attention.cpp).
// Arguments are checked by check_decode_args (csrc/cpu/decode_args.h) before anything runs.
// Requirements (the host pads otherwise): k, v rows 16-byte aligned and D·sizeof % 16 == 0.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_pipeline.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "../cpu/decode_args.h"

namespace torch_cp {
namespace {

constexpr int kThreads = 128, kWarps = kThreads / 32, kChunk = 8, kCopyBytes = 16, kMaxDim = 256;
constexpr double kLog2e = 1.4426950408889634, kLn2 = 0.6931471805599453;

using OptTensor = std::optional<at::Tensor>;

struct Params {
  const void *q, *k, *v;
  const int64_t *kv_lens, *kv_pos, *q_pos;  // [B], [B, L], [B] or nullptr
  const bool* mask_flags;                   // bool attn_mask (true = attend), or nullptr
  const float* mask_values;                 // additive float32 attn_mask, or nullptr
  int64_t m_sb, m_sh, m_sq, m_sl;           // attn_mask strides over [B, Hq, Sq, L] (0: broadcast)
  float *out, *lse;                         // [S, rows_total, D], [S, rows_total]
  int64_t q_sb, q_sh, q_ss, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, pos_sb, rows_total, window;  // window < 0: none
  int kv_heads, group, q_len, kv_len, dim, rows, row_stride, n_splits;  // rows = group·q_len per KV head
  float qk_scale, cap2;  // q is multiplied by qk_scale; cap2 > 0: s = cap2·tanh(q·k), else s = q·k
  bool causal;
};

template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <int N, typename T, typename A>
__device__ __forceinline__ void load(const T* src, A* dst) {
  const auto pk = *reinterpret_cast<const Pack<T, N>*>(src);
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = static_cast<A>(pk.v[i]);
}

template <typename A>
__device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float exp2_(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_(double x) { return exp2(x); }

// Whether attn_mask lets query row `row` of KV head h's group see key t; `bias` gets its additive value in
// base 2 (0 for a bool mask or none).
__device__ __forceinline__ bool mask_shows(const Params& p, int64_t b, int64_t h, int row, int64_t t, float& bias) {
  bias = 0.f;
  if (p.mask_flags == nullptr && p.mask_values == nullptr) return true;
  const int64_t head = h * p.group + row / p.q_len, qi = row % p.q_len;
  const int64_t i = b * p.m_sb + head * p.m_sh + qi * p.m_sq + t * p.m_sl;
  if (p.mask_flags != nullptr) return p.mask_flags[i];
  const float x = p.mask_values[i];
  bias = x * 1.4426950408889634f;  // log2 e: the kernel's scores are base 2
  return x != -INFINITY;
}

// Whether query row `row` sees key t (global position kp) by position (causal, window).
__device__ __forceinline__ bool position_shows(const Params& p, int64_t b, int row, int64_t kp) {
  if (!p.causal && p.window < 0) return true;
  const int64_t qp = p.q_pos[b] + row % p.q_len;
  return (!p.causal || kp <= qp) && (p.window < 0 || kp > qp - p.window);
}

// Whether any of the block's rows [row0, row0 + rows) sees any of keys [t0, t0 + n): a vote of the whole
// block, so every thread must call it (see the note at the top).
__device__ bool tile_visible(const Params& p, int64_t b, int64_t h, int row0, int rows, int t0, int n) {
  bool any = false;
  for (int i = threadIdx.x; i < rows * n && !any; i += kThreads) {
    const int r = i / n, t = i % n;
    const int64_t kp = p.kv_pos != nullptr ? p.kv_pos[b * p.pos_sb + t0 + t] : t0 + t;
    float bias;
    any = position_shows(p, b, row0 + r, kp) && mask_shows(p, b, h, row0 + r, t0 + t, bias);
  }
  return __syncthreads_or(any);
}

// Stride of one key's row of P in shared memory: padded so that the row stores are conflict-free.
__host__ __device__ constexpr int p_stride(int r) { return r >= 8 ? r + 4 : r; }

struct Layout {
  size_t q, k, v, p, alpha, stat, red, total;
};

// Shared memory of one block; the same arithmetic sizes the launch on the host.
template <typename scalar_t, int R, int KB>
__host__ __device__ Layout make_layout(int dim, int row_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  const size_t tile = size_t(32 * KB) * row_stride * sizeof(scalar_t);
  auto up = [](size_t x) { return (x + 15) / 16 * 16; };
  Layout l{};
  l.k = l.q + up(size_t(R) * row_stride * sizeof(acc_t));
  l.v = l.k + 2 * up(tile);
  l.p = l.v + 2 * up(tile);
  l.alpha = l.p + up(size_t(32 * KB) * p_stride(R) * sizeof(acc_t));
  l.stat = l.alpha + up(R * sizeof(acc_t));
  l.red = l.stat + up(2 * R * sizeof(acc_t));
  l.total = l.red + up(size_t(R) * dim * sizeof(acc_t));
  return l;
}

// q rows [row0, row0 + rows) of head group h, times qk_scale, into q_s [R, row_stride] (zero padded).
template <typename scalar_t, typename acc_t, int R>
__device__ void load_query(const Params& p, int64_t b, int64_t h, int row0, int rows, acc_t* q_s) {
  const auto* q = static_cast<const scalar_t*>(p.q);
  for (int i = threadIdx.x; i < R * p.row_stride; i += kThreads) {
    const int r = i / p.row_stride, d = i % p.row_stride, row = row0 + r;
    acc_t x = 0;
    if (r < rows && d < p.dim) {
      const int64_t head = h * p.group + row / p.q_len, qi = row % p.q_len;
      x = static_cast<acc_t>(q[b * p.q_sb + head * p.q_sh + qi * p.q_ss + d]) * acc_t(p.qk_scale);
    }
    q_s[i] = x;
  }
}

// Zeroes the padding columns [dim, row_stride) of both buffers of a k or v tile (never copied into).
template <typename scalar_t>
__device__ void zero_padding(scalar_t* tiles, int keys, int dim, int row_stride) {
  const int pad = row_stride - dim;
  for (int i = threadIdx.x; i < 2 * keys * pad; i += kThreads) {
    tiles[(i / pad) * row_stride + dim + i % pad] = scalar_t(0.f);
  }
}

// Starts the copy of keys [t0, t0 + n) of one row of k or v into a tile [KT, row_stride].
template <typename scalar_t>
__device__ void copy_tile(scalar_t* dst, const scalar_t* src, int64_t stride, int n, int dim, int row_stride) {
  constexpr int kVec = kCopyBytes / sizeof(scalar_t);
  const int per_row = dim / kVec;
  for (int i = threadIdx.x; i < n * per_row; i += kThreads) {
    const int t = i / per_row, c = (i % per_row) * kVec;
    __pipeline_memcpy_async(dst + t * row_stride + c, src + t * stride + c, kCopyBytes);
  }
}

// Step 1 of [Note: CUDA decode kernel] for one tile of n keys starting at key t0.
// A NaN or +inf score of a visible key sets the row's nan_row flag (the same in every lane of the
// warp) and is then treated as masked; the row is stored as NaN at the end (see [Note: NaN in
// attention] in torch_cp/reference.py).
template <typename scalar_t, typename acc_t, int R, int KB>
__device__ void scores_softmax(const Params& p, const acc_t* q_s, const scalar_t* k_tile, int64_t b, int64_t h,
                               int row0, int rows, int t0, int n, acc_t* m, acc_t* l, bool* nan_row, acc_t* p_s,
                               acc_t* alpha_s) {
  constexpr int RW = R / kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  acc_t s[RW][KB] = {};
  for (int c = 0; c < p.dim; c += kChunk) {
    acc_t kc[KB][kChunk];
#pragma unroll
    for (int j = 0; j < KB; ++j) load<kChunk>(k_tile + (lane + 32 * j) * p.row_stride + c, kc[j]);
#pragma unroll
    for (int i = 0; i < RW; ++i) {
      if (warp * RW + i >= rows) continue;
      acc_t qc[kChunk];
      load<kChunk>(q_s + (warp * RW + i) * p.row_stride + c, qc);
#pragma unroll
      for (int j = 0; j < KB; ++j)
#pragma unroll
        for (int e = 0; e < kChunk; ++e) s[i][j] += qc[e] * kc[j][e];
    }
  }
  int64_t kp[KB];
#pragma unroll
  for (int j = 0; j < KB; ++j) {
    const int t = lane + 32 * j;
    kp[j] = p.kv_pos != nullptr && t < n ? p.kv_pos[b * p.pos_sb + t0 + t] : t0 + t;
  }
  const acc_t neg_inf = -INFINITY;
  Pack<acc_t, RW> probs[KB];
#pragma unroll
  for (int i = 0; i < RW; ++i) {
    const int r = warp * RW + i;
    if (r >= rows) {  // padding rows: P = 0, so they add nothing
#pragma unroll
      for (int j = 0; j < KB; ++j) probs[j].v[i] = 0;
      if (lane == 0) alpha_s[r] = 0;
      continue;
    }
    acc_t tile_max = neg_inf;
    bool bad = false;
#pragma unroll
    for (int j = 0; j < KB; ++j) {
      float bias = 0.f;  // attn_mask's additive value, base 2
      const bool visible = lane + 32 * j < n && position_shows(p, b, row0 + r, kp[j]) &&
                           mask_shows(p, b, h, row0 + r, t0 + lane + 32 * j, bias);
      const acc_t x = (p.cap2 > 0.f ? acc_t(p.cap2) * tanh(s[i][j]) : s[i][j]) + acc_t(bias);
      const bool nonfinite = visible && (x != x || x == acc_t(INFINITY));  // NaN or +inf
      bad = bad || nonfinite;
      s[i][j] = visible && !nonfinite ? x : neg_inf;
      tile_max = max(tile_max, s[i][j]);
    }
    nan_row[i] = nan_row[i] || __any_sync(0xffffffffu, bad);
    const acc_t m_new = max(m[i], warp_max(tile_max));
    const acc_t m_use = m_new == neg_inf ? acc_t(0) : m_new;
    const acc_t alpha = exp2_(m[i] - m_use);
    acc_t sum = 0;
#pragma unroll
    for (int j = 0; j < KB; ++j) {
      probs[j].v[i] = exp2_(s[i][j] - m_use);
      sum += probs[j].v[i];
    }
    l[i] = l[i] * alpha + warp_sum(sum);
    m[i] = m_new;
    if (lane == 0) alpha_s[r] = alpha;
  }
#pragma unroll
  for (int j = 0; j < KB; ++j)
    *reinterpret_cast<Pack<acc_t, RW>*>(p_s + (lane + 32 * j) * p_stride(R) + warp * RW) = probs[j];
}

// Step 2 of [Note: CUDA decode kernel]: acc [R, 4] of this thread's 4 columns += P·V over its keys.
template <typename scalar_t, typename acc_t, int R>
__device__ void accumulate_pv(const Params& p, const scalar_t* v_tile, int n, const acc_t* p_s, const acc_t* alpha_s,
                              acc_t (&acc)[R][4]) {
  const int n_cols = (p.dim + 3) / 4, n_groups = kThreads / n_cols;
  const int g = threadIdx.x / n_cols, c = threadIdx.x % n_cols;
  if (g >= n_groups) return;
  acc_t alpha[R];
#pragma unroll
  for (int r = 0; r < R; r += 4) load<4>(alpha_s + r, alpha + r);
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[r][e] *= alpha[r];
  for (int t = g; t < n; t += n_groups) {
    acc_t vv[4], pp[R];
    load<4>(v_tile + t * p.row_stride + 4 * c, vv);
#pragma unroll
    for (int r = 0; r < R; r += 4) load<4>(p_s + t * p_stride(R) + r, pp + r);
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][e] += pp[r] * vv[e];
  }
}

template <typename scalar_t, int R, int KB>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const Params p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int KT = 32 * KB, RW = R / kWarps;
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout lay = make_layout<scalar_t, R, KB>(p.dim, p.row_stride);
  auto* q_s = reinterpret_cast<acc_t*>(smem + lay.q);
  auto* k_s = reinterpret_cast<scalar_t*>(smem + lay.k);
  auto* v_s = reinterpret_cast<scalar_t*>(smem + lay.v);
  auto* p_s = reinterpret_cast<acc_t*>(smem + lay.p);
  auto* alpha_s = reinterpret_cast<acc_t*>(smem + lay.alpha);
  auto* stat_s = reinterpret_cast<acc_t*>(smem + lay.stat);
  auto* red_s = reinterpret_cast<acc_t*>(smem + lay.red);
  const int64_t b = blockIdx.x / p.kv_heads, h = blockIdx.x % p.kv_heads;
  const int row0 = blockIdx.z * R, rows = min(R, p.rows - row0);
  const size_t tile_elems = (lay.v - lay.k) / 2 / sizeof(scalar_t);
  load_query<scalar_t, acc_t, R>(p, b, h, row0, rows, q_s);
  zero_padding(k_s, KT, p.dim, p.row_stride);
  zero_padding(v_s, KT, p.dim, p.row_stride);

  // This split's keys: the row's valid keys cut into n_splits contiguous chunks.
  const int64_t valid = p.kv_lens ? p.kv_lens[b] : p.kv_len;
  const int len = valid < 0 ? 0 : valid > p.kv_len ? p.kv_len : int(valid);
  const int chunk = (len + p.n_splits - 1) / p.n_splits;
  const int start = min(len, int(blockIdx.y) * chunk), end = min(len, start + chunk);
  const auto* k_src = static_cast<const scalar_t*>(p.k) + b * p.k_sb + h * p.k_sh;
  const auto* v_src = static_cast<const scalar_t*>(p.v) + b * p.v_sb + h * p.v_sh;
  const int n_tiles = (end - start + KT - 1) / KT;
  auto issue = [&](int it) {
    const int t0 = start + it * KT, n = min(KT, end - t0), buf = it & 1;
    copy_tile(k_s + buf * tile_elems, k_src + t0 * p.k_sl, p.k_sl, n, p.dim, p.row_stride);
    copy_tile(v_s + buf * tile_elems, v_src + t0 * p.v_sl, p.v_sl, n, p.dim, p.row_stride);
  };
  acc_t m[RW], l[RW], acc[R][4] = {};
  bool nan_row[RW];
#pragma unroll
  for (int i = 0; i < RW; ++i) m[i] = -INFINITY, l[i] = 0, nan_row[i] = false;
  // Whether tile `it` is read: every tile without masks, else only those some row sees (a block vote).
  const bool votes = p.mask_flags != nullptr || p.mask_values != nullptr || p.causal || p.window >= 0;
  auto shown = [&](int it) {
    const int t0 = start + it * KT;
    return !votes || tile_visible(p, b, h, row0, rows, t0, min(KT, end - t0));
  };
  bool next_shown = n_tiles > 0 && shown(0);
  if (next_shown) issue(0);
  __pipeline_commit();
  for (int it = 0; it < n_tiles; ++it) {
    const bool this_shown = next_shown;
    next_shown = it + 1 < n_tiles && shown(it + 1);
    if (next_shown) issue(it + 1);
    __pipeline_commit();
    __pipeline_wait_prior(1);
    __syncthreads();  // tile `it` (and, on the first pass, q_s and the zeroed padding) visible to all
    if (!this_shown) continue;  // the same in every thread: nothing was copied, nothing to add
    const int t0 = start + it * KT, n = min(KT, end - t0), buf = it & 1;
    scores_softmax<scalar_t, acc_t, R, KB>(p, q_s, k_s + buf * tile_elems, b, h, row0, rows, t0, n, m, l, nan_row,
                                           p_s, alpha_s);
    __syncthreads();
    accumulate_pv<scalar_t, acc_t, R>(p, v_s + buf * tile_elems, n, p_s, alpha_s, acc);
    __syncthreads();  // before this buffer and p_s are overwritten
  }

  // Sum the key groups' accumulators in red_s [rows, dim], one group at a time (deterministic).
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < RW; ++i) {
    if (nan_row[i]) m[i] = l[i] = acc_t(NAN);  // stored below as out = NaN, lse = NaN
    if (lane == 0) stat_s[warp * RW + i] = m[i], stat_s[R + warp * RW + i] = l[i];
  }
  const int n_cols = (p.dim + 3) / 4, n_groups = kThreads / n_cols;
  const int g = threadIdx.x / n_cols, c = threadIdx.x % n_cols;
  for (int k = 0; k < n_groups; ++k) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc_t* dst = red_s + r * p.dim + 4 * c + e;
        if (g == k && r < rows && 4 * c + e < p.dim) *dst = (k == 0 ? acc_t(0) : *dst) + acc[r][e];
      }
    __syncthreads();
  }
  const int64_t first_row = (b * p.kv_heads + h) * p.rows + row0, part = int64_t(blockIdx.y) * p.rows_total;
  for (int i = threadIdx.x; i < rows * p.dim; i += kThreads) {
    const int r = i / p.dim;
    const bool empty = stat_s[r] == acc_t(-INFINITY);
    p.out[(part + first_row + r) * p.dim + i % p.dim] = empty ? 0.f : float(red_s[i] / stat_s[R + r]);
  }
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    const bool empty = stat_s[r] == acc_t(-INFINITY);
    p.lse[part + first_row + r] = empty ? -INFINITY : float((stat_s[r] + log2(stat_s[R + r])) * acc_t(kLn2));
  }
}

// ---- host side -----------------------------------------------------------------------------------------------

// The op's arguments after padding: k/v rows 16-byte aligned, D a multiple of 16 bytes (q padded to match).
struct Inputs {
  at::Tensor q, k, v;
  OptTensor lens, pos, qpos, mask;  // mask: attn_mask expanded to [B, Hq, Sq, L] (bool or float32)
  double scale, softcap;
  bool causal;
  int64_t window, num_splits;
};

// Row stride of the k/v tiles in shared memory: an odd multiple of 16 bytes, so that the lanes of a
// warp reading 16 bytes from 8 different rows hit 8 different bank quads.
int tile_row_stride(int64_t dim, int64_t es) {
  const int64_t r8 = (dim + 7) / 8 * 8;
  return int((r8 * es / 16) % 2 == 0 ? r8 + 16 / es : r8);
}

Params make_params(const Inputs& in, at::Tensor& out, at::Tensor& lse) {
  const at::Tensor &q = in.q, &k = in.k, &v = in.v;
  const bool capped = in.softcap > 0;
  Params p{};
  p.q = q.const_data_ptr(), p.k = k.const_data_ptr(), p.v = v.const_data_ptr();
  p.kv_lens = in.lens ? in.lens->const_data_ptr<int64_t>() : nullptr;
  p.kv_pos = in.pos ? in.pos->const_data_ptr<int64_t>() : nullptr;
  p.q_pos = in.qpos ? in.qpos->const_data_ptr<int64_t>() : nullptr;
  const bool flags = in.mask && in.mask->scalar_type() == at::kBool;
  p.mask_flags = flags ? in.mask->const_data_ptr<bool>() : nullptr;
  p.mask_values = in.mask && !flags ? in.mask->const_data_ptr<float>() : nullptr;
  if (in.mask) {
    p.m_sb = in.mask->stride(0), p.m_sh = in.mask->stride(1);
    p.m_sq = in.mask->stride(2), p.m_sl = in.mask->stride(3);
  }
  p.out = out.mutable_data_ptr<float>(), p.lse = lse.mutable_data_ptr<float>();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_ss = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.pos_sb = in.pos ? in.pos->stride(0) : 0, p.rows_total = out.size(1), p.window = in.window;
  p.kv_heads = int(k.size(1)), p.group = int(q.size(1) / k.size(1)), p.q_len = int(q.size(2));
  p.kv_len = int(k.size(2)), p.dim = int(q.size(3)), p.rows = p.group * p.q_len, p.n_splits = int(out.size(0));
  p.row_stride = tile_row_stride(p.dim, k.element_size());
  p.qk_scale = float(capped ? in.scale / in.softcap : in.scale * kLog2e);
  p.cap2 = float(capped ? in.softcap * kLog2e : 0.0);
  p.causal = in.causal;
  return p;
}

// Key splits: `requested` if > 0; else as many as fill one wave of resident blocks without starting a
// second, partial one, keeping at least 256 keys per split.
int64_t choose_splits(int64_t requested, int64_t blocks, int64_t kv_len, int64_t wave) {
  if (requested > 0) return std::min<int64_t>(requested, 65535);
  return std::clamp<int64_t>(std::min(wave / std::max<int64_t>(blocks, 1), kv_len / 256), 1, 128);
}

// Runs one instantiation: out [S, B·Hq·Sq, D] and lse [S, B·Hq·Sq], float32, one part per key split.
template <typename scalar_t, int R, int KB>
std::tuple<at::Tensor, at::Tensor> run(const Inputs& in, dim3 grid) {
  auto* kernel = decode_split_kernel<scalar_t, R, KB>;
  const int64_t dim = in.q.size(3), rows_total = in.q.size(0) * in.q.size(1) * in.q.size(2);
  const size_t smem = make_layout<scalar_t, R, KB>(int(dim), tile_row_stride(dim, sizeof(scalar_t))).total;
  int device = 0, max_smem = 0, sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  TORCH_CHECK_VALUE(smem <= size_t(max_smem), "decode_attention: head dim ", dim, " needs ", smem,
                    " bytes of shared memory in ", in.q.scalar_type(), "; the device has ", max_smem);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  grid.y = unsigned(choose_splits(in.num_splits, int64_t(grid.x) * grid.z, in.k.size(2), int64_t(sms) * per_sm));
  const auto f32 = in.q.options().dtype(at::kFloat);
  auto out = at::empty({int64_t(grid.y), rows_total, dim}, f32), lse = at::empty({int64_t(grid.y), rows_total}, f32);
  if (rows_total == 0) return {out, lse};
  kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(make_params(in, out, lse));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> run_for_rows(const Inputs& in, dim3 grid, int block_rows) {
  const bool wide_tile = in.q.size(3) * sizeof(scalar_t) <= 256;  // 64-key tiles for short rows, else 32
#define TORCH_CP_RUN(R) return wide_tile ? run<scalar_t, R, 2>(in, grid) : run<scalar_t, R, 1>(in, grid)
  if (block_rows == 4) TORCH_CP_RUN(4);
  if (block_rows == 8) TORCH_CP_RUN(8);
  TORCH_CP_RUN(16);
#undef TORCH_CP_RUN
}

// k or v with 16-byte aligned rows and D·sizeof % 16 == 0, zero-padding D (a copy) when needed.
at::Tensor aligned_rows(const at::Tensor& t, int64_t dim_pad) {
  const int64_t es = t.element_size();
  bool ok = t.size(3) == dim_pad && t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && (t.stride(d) * es) % 16 == 0;
  if (ok) return t;
  TORCH_WARN_ONCE("torch_cp decode_attention (CUDA): k/v rows are not 16-byte aligned (head dim ", t.size(3),
                  ", strides ", t.strides(), "); copying them into a padded buffer first");
  auto padded = at::zeros({t.size(0), t.size(1), t.size(2), dim_pad}, t.options());
  padded.narrow(3, 0, t.size(3)).copy_(t);
  return padded;
}

// A contiguous int64 copy of an optional index tensor (already checked by check_decode_args).
OptTensor as_long(const OptTensor& t) {
  if (!t) return std::nullopt;
  return t->to(at::kLong).contiguous();
}

// attn_mask as bool or float32 without the broadcast (stride 0) extent of an expanded mask, so that
// converting it never materialises the broadcast.
at::Tensor compact_mask(const at::Tensor& mask) {
  at::Tensor m = mask;
  for (int64_t d = 0; d < m.dim(); ++d)
    if (m.stride(d) == 0 && m.size(d) > 1) m = m.narrow(d, 0, 1);
  return m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat ? m : m.to(at::kFloat);
}

// kv_lens cut after each row's last key that the (compact) mask shows to some query: the keys past it
// are hidden anyway, and the splits then share only the keys before it. On the device, no sync.
at::Tensor trim_to_mask(const OptTensor& lens, const at::Tensor& mask, int64_t batch, int64_t kv_len) {
  const auto long_opts = mask.options().dtype(at::kLong);
  if (kv_len == 0) return at::zeros({batch}, long_opts);
  at::Tensor shown = mask.scalar_type() == at::kBool ? mask : mask.ne(-INFINITY);
  while (shown.dim() < 4) shown = shown.unsqueeze(0);
  shown = shown.any(2).any(1);  // [B or 1, L or 1]
  const at::Tensor last = (at::arange(1, kv_len + 1, long_opts) * shown).amax(-1).expand({batch}).contiguous();
  return lens ? at::minimum(last, lens->clamp(0, kv_len)) : last;
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const OptTensor& kv_lens, const OptTensor& kv_pos,
                                                         const OptTensor& q_pos, double scale, double softcap,
                                                         bool is_causal, int64_t window, int64_t num_splits,
                                                         const OptTensor& attn_mask) {
  check_decode_args(q, k, v, kv_lens, kv_pos, q_pos, scale, softcap, is_causal, window, num_splits, attn_mask);
  TORCH_CHECK_VALUE(q.is_cuda(), "decode_attention (CUDA): q, k, v must be CUDA tensors, got ", q.device());
  TORCH_CHECK_VALUE(q.size(3) <= kMaxDim, "decode_attention: head dim ", q.size(3), " is not in [1, ", kMaxDim,
                    "] (q ", q.sizes(), ")");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch = q.size(0), q_heads = q.size(1), q_len = q.size(2), dim = q.size(3);
  const int64_t vec = kCopyBytes / k.element_size(), dim_pad = (dim + vec - 1) / vec * vec;
  const auto q1 = q.stride(3) == 1 ? q : q.contiguous();
  OptTensor lens = as_long(kv_lens), mask;
  if (attn_mask) {
    const at::Tensor compact = compact_mask(*attn_mask);
    lens = trim_to_mask(lens, compact, batch, k.size(2));
    mask = compact.expand({batch, q_heads, q_len, k.size(2)});
  }
  Inputs in{dim_pad == dim ? q1 : at::constant_pad_nd(q1, {0, dim_pad - dim}), aligned_rows(k, dim_pad),
            aligned_rows(v, dim_pad), lens, as_long(kv_pos), as_long(q_pos), mask, scale, softcap, is_causal,
            window, num_splits};
  const int64_t rows = q_heads / k.size(1) * q_len;
  const int block_rows = rows <= 4 ? 4 : rows <= 8 ? 8 : 16;
  const dim3 grid(batch * k.size(1), 1, (rows + block_rows - 1) / block_rows);
  TORCH_CHECK_VALUE(grid.z <= 65535, "decode_attention: too many query rows per KV head (", rows, ")");
  at::Tensor out, lse;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention_cuda", [&] {
    std::tie(out, lse) = run_for_rows<scalar_t>(in, grid, block_rows);
  });
  if (out.size(0) > 1) {
    static auto merge = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("torch_cp::merge_states", "")
                            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>();
    std::tie(out, lse) = merge.call(out, lse);
  } else {
    out = out.select(0, 0), lse = lse.select(0, 0);
  }
  out = out.view({batch, q_heads, q_len, dim_pad});
  if (dim_pad != dim) out = out.narrow(3, 0, dim).contiguous();
  return {out, lse.view({batch, q_heads, q_len})};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cp, CUDA, m) { m.impl("decode_attention", &decode_attention_cuda); }

}  // namespace torch_cp
