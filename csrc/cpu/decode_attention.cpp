// Split-KV decode attention with log-sum-exp on the CPU: the op torch_cp::decode_attention.
//
// Work is split over (batch, KV head, key split); each task runs the online softmax of
// attend_tile over its keys for every query row of the GQA group (see [Note: CPU decode kernel]),
// then the splits are merged exactly (see [Note: merge of partial states]).
// Key/query positions for the causal and sliding-window masks follow
// [Note: key and query positions] in torch_cp/reference.py; the Python wrapper always passes
// q_pos when a mask is needed.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "attend_block.h"
#include "decode_args.h"
#include "merge.h"

namespace torch_cp {
namespace {

constexpr int64_t kTile = 32;
constexpr int64_t kMinKeysPerSplit = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Problem {
  int64_t batch, q_heads, kv_heads, q_len, kv_len, dim, group, splits;
  float scale, softcap;
  bool causal;
  int64_t window;  // < 0: none
  const int64_t* kv_lens;  // [B] or nullptr
  const int64_t* kv_pos;   // [B, L] or nullptr
  const int64_t* q_pos;    // [B] or nullptr (needed when causal or window >= 0)
  int64_t rows() const { return group * q_len; }
  bool masked() const { return causal || window >= 0; }
};

// Per-thread buffers of one task.
struct Scratch {
  std::vector<float> q, k, v, bias, scores, m, l, acc;
  explicit Scratch(const Problem& p)
      : q(p.rows() * p.dim), k(kTile * p.dim), v(kTile * p.dim), bias(p.rows() * kTile),
        scores(p.rows() * kTile), m(p.rows()), l(p.rows()), acc(p.rows() * p.dim) {}
};

// Fills the additive mask of one tile; returns false when nothing in it is masked.
bool fill_bias(const Problem& p, int64_t b, int64_t t0, int64_t n, float* bias) {
  bool any = false;
  for (int64_t r = 0; r < p.rows(); ++r) {
    const int64_t qp = p.q_pos[b] + r % p.q_len;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t kp = p.kv_pos ? p.kv_pos[b * p.kv_len + t0 + t] : t0 + t;
      const bool hidden = (p.causal && kp > qp) || (p.window >= 0 && kp <= qp - p.window);
      bias[r * n + t] = hidden ? kNegInf : 0.f;
      any = any || hidden;
    }
  }
  return any;
}

template <typename scalar_t>
const float* tile_rows(const scalar_t* src, int64_t stride, int64_t n, int64_t dim, float* buf, int64_t& ld) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    ld = stride;
    return src;
  } else {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t d = 0; d < dim; ++d) buf[t * dim + d] = static_cast<float>(src[t * stride + d]);
    ld = dim;
    return buf;
  }
}

// Asks for the rows of the next tile while this one is computed: the kernel's reads are then
// streams the memory system can keep in flight, whatever order the tile's arithmetic uses.
template <typename scalar_t>
void prefetch_tile(const scalar_t* rows, int64_t stride, int64_t n, int64_t dim) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t d = 0; d < dim; d += kLine) __builtin_prefetch(rows + t * stride + d);
}

template <typename scalar_t>
void run_task(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t b,
              int64_t h, int64_t split, Scratch& s, float* out, float* lse) {
  const int64_t len = p.kv_lens ? std::clamp<int64_t>(p.kv_lens[b], 0, p.kv_len) : p.kv_len;
  const int64_t chunk = (len + p.splits - 1) / p.splits;
  const int64_t begin = std::min(len, split * chunk), end = std::min(len, begin + chunk);
  const auto* qd = q.const_data_ptr<scalar_t>();
  for (int64_t r = 0; r < p.rows(); ++r) {
    const auto* src = qd + b * q.stride(0) + (h * p.group + r / p.q_len) * q.stride(1) + (r % p.q_len) * q.stride(2);
    for (int64_t d = 0; d < p.dim; ++d) s.q[r * p.dim + d] = static_cast<float>(src[d]) * p.scale;
  }
  std::fill(s.m.begin(), s.m.end(), kNegInf);
  std::fill(s.l.begin(), s.l.end(), 0.f);
  std::fill(s.acc.begin(), s.acc.end(), 0.f);
  const auto* kd = k.const_data_ptr<scalar_t>() + b * k.stride(0) + h * k.stride(1);
  const auto* vd = v.const_data_ptr<scalar_t>() + b * v.stride(0) + h * v.stride(1);
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int64_t n = std::min(kTile, end - t0);
    const int64_t next = std::min(kTile, end - t0 - n);
    prefetch_tile(kd + (t0 + n) * k.stride(2), k.stride(2), next, p.dim);
    prefetch_tile(vd + (t0 + n) * v.stride(2), v.stride(2), next, p.dim);
    TileArgs a{};
    a.q = s.q.data();
    a.k = tile_rows(kd + t0 * k.stride(2), k.stride(2), n, p.dim, s.k.data(), a.ld_k);
    a.v = tile_rows(vd + t0 * v.stride(2), v.stride(2), n, p.dim, s.v.data(), a.ld_v);
    a.bias = p.masked() && fill_bias(p, b, t0, n, s.bias.data()) ? s.bias.data() : nullptr;
    a.rows = p.rows();
    a.dim = p.dim;
    a.n_keys = n;
    a.softcap = p.softcap;
    attend_tile(a, s.scores.data(), s.m.data(), s.l.data(), s.acc.data());
  }
  for (int64_t r = 0; r < p.rows(); ++r) {
    const int64_t row = (b * p.q_heads + h * p.group + r / p.q_len) * p.q_len + r % p.q_len;
    // An empty row is 0 even when its (hidden) values held NaN; a NaN row (m = l = NaN) stays NaN.
    const bool empty = s.m[r] == kNegInf;
    const float inv = 1.f / s.l[r];
    for (int64_t d = 0; d < p.dim; ++d) out[row * p.dim + d] = empty ? 0.f : s.acc[r * p.dim + d] * inv;
    lse[row] = empty ? kNegInf : s.m[r] + std::log(s.l[r]);
  }
}

// Key splits per task: `requested` if > 0 (at most one per key and 256: more only add empty splits,
// and the merge is exact either way), else enough to give every thread about four tasks.
int64_t choose_splits(int64_t requested, int64_t tasks, int64_t kv_len) {
  if (requested > 0) return std::clamp<int64_t>(std::min<int64_t>(requested, kv_len), 1, 256);
  const int64_t want = (4 * at::get_num_threads() + tasks - 1) / std::max<int64_t>(1, tasks);
  return std::clamp<int64_t>(std::min(want, kv_len / kMinKeysPerSplit), 1, 64);
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const std::optional<at::Tensor>& kv_lens,
                                                        const std::optional<at::Tensor>& kv_pos,
                                                        const std::optional<at::Tensor>& q_pos, double scale,
                                                        double softcap, bool is_causal, int64_t window,
                                                        int64_t num_splits) {
  check_decode_args(q, k, v, kv_lens, kv_pos, q_pos, scale, softcap, is_causal, window, num_splits);
  const auto qc = q.stride(3) == 1 ? q : q.contiguous();
  const auto kc = k.stride(3) == 1 ? k : k.contiguous();
  const auto vc = v.stride(3) == 1 ? v : v.contiguous();
  std::optional<at::Tensor> lens, pos, qpos;
  if (kv_lens) lens = kv_lens->to(at::kLong).contiguous();
  if (kv_pos) pos = kv_pos->to(at::kLong).contiguous();
  if (q_pos) qpos = q_pos->to(at::kLong).contiguous();
  Problem p{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), q.size(1) / k.size(1), 1,
            static_cast<float>(scale), static_cast<float>(softcap), is_causal, window,
            lens ? lens->const_data_ptr<int64_t>() : nullptr, pos ? pos->const_data_ptr<int64_t>() : nullptr,
            qpos ? qpos->const_data_ptr<int64_t>() : nullptr};
  const int64_t tasks = p.batch * p.kv_heads;
  p.splits = choose_splits(num_splits, tasks, p.kv_len);
  const int64_t rows = p.batch * p.q_heads * p.q_len;
  auto f32 = q.options().dtype(at::kFloat);
  auto out = at::empty({p.splits, rows, p.dim}, f32);
  auto lse = at::empty({p.splits, rows}, f32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention_cpu", [&] {
    at::parallel_for(0, tasks * p.splits, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch(p);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t split = i % p.splits, bh = i / p.splits;
        run_task<scalar_t>(p, qc, kc, vc, bh / p.kv_heads, bh % p.kv_heads, split, scratch,
                           out.mutable_data_ptr<float>() + split * rows * p.dim,
                           lse.mutable_data_ptr<float>() + split * rows);
      }
    });
  });
  const auto shape = std::vector<int64_t>{p.batch, p.q_heads, p.q_len};
  if (p.splits == 1) return {out.view({p.batch, p.q_heads, p.q_len, p.dim}), lse.view(shape)};
  auto merged = at::empty({rows, p.dim}, f32);
  auto merged_lse = at::empty({rows}, f32);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    merge_rows<float>(out.const_data_ptr<float>(), lse.const_data_ptr<float>(), merged.mutable_data_ptr<float>(),
                      merged_lse.mutable_data_ptr<float>(), p.splits, rows, p.dim, begin, end);
  });
  return {merged.view({p.batch, p.q_heads, p.q_len, p.dim}), merged_lse.view(shape)};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cp, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace torch_cp
