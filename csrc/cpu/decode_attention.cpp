// Split-KV decode attention with log-sum-exp on the CPU: the op torch_cp::decode_attention.
//
// Work is split over (batch, KV head, key split); each task runs the online softmax of
// attend_tile over its tiles of keys for every query row of the GQA group (see [Note: CPU decode
// kernel]), then the splits are merged exactly (see [Note: merge of partial states]).
// Key/query positions for the causal and sliding-window masks follow
// [Note: key and query positions] in torch_cp/reference.py; the Python wrapper always passes
// q_pos when a mask is needed.
//
// [Note: skipping hidden tiles]
// Keys are read in tiles of kTile. With attn_mask, is_causal or window, a first pass marks which
// tiles of each (batch row, KV head) any of its query rows sees (a scan that stops at the first
// visible key, so a visible tile costs one probe); the splits then share the visible tiles evenly
// and never read the keys and values of the others, nor prefetch them. A static cache of Lmax slots
// holding L tokens, masked by attn_mask, so costs ~L, not Lmax. A hidden key never reaches a row
// (as [Note: NaN in attention] asks), so skipping changes no result. The marking pass itself must
// stay cheap when the query rows are many: a 64-token prefill into a 32K-slot cache probes every
// key of every hidden tile in each of 64 mask rows. So a contiguous mask row is searched as bytes
// (bool) or as float bits (additive), a mask broadcast over heads is scanned once per batch row,
// and the pass runs in parallel over tiles (prefill attention of that shape: 3.6 ms -> 0.27 ms).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
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
constexpr uint32_t kNegInfBits = 0xff800000u;  // -inf as float32 bits

// attn_mask as the kernel reads it: bool (true = attend) or float32 (added; -inf = hidden), indexed by
// the strides of its expansion to [B, Hq, Sq, L] (0 on broadcast dims).
struct Mask {
  const bool* flags = nullptr;   // bool mask, or nullptr
  const float* values = nullptr; // additive mask, or nullptr
  int64_t sb = 0, sh = 0, sq = 0, sl = 0;
  bool any() const { return flags != nullptr || values != nullptr; }
  // The bias of element `i` (an offset from the strides): 0 or -inf for a bool mask, the value else.
  float bias(int64_t i) const { return flags ? (flags[i] ? 0.f : kNegInf) : values[i]; }
};

struct Problem {
  int64_t batch, q_heads, kv_heads, q_len, kv_len, dim, group, splits;
  float scale, softcap;
  bool causal;
  int64_t window;  // < 0: none
  const int64_t* kv_lens;  // [B] or nullptr
  const int64_t* kv_pos;   // [B, L] or nullptr
  const int64_t* q_pos;    // [B] or nullptr (needed when causal or window >= 0)
  Mask mask;
  int64_t rows() const { return group * q_len; }
  bool positional() const { return causal || window >= 0; }
  bool masked() const { return positional() || mask.any(); }
  int64_t length(int64_t b) const { return kv_lens ? std::clamp<int64_t>(kv_lens[b], 0, kv_len) : kv_len; }
  // Offset in the mask of query row r (of KV head h's group) of batch row b, at key 0.
  int64_t mask_row(int64_t b, int64_t h, int64_t r) const {
    return b * mask.sb + (h * group + r / q_len) * mask.sh + (r % q_len) * mask.sq;
  }
  // Whether position masks hide key t (global position kp) from query row r.
  bool hidden_by_position(int64_t b, int64_t r, int64_t t) const {
    if (!positional()) return false;
    const int64_t qp = q_pos[b] + r % q_len, kp = kv_pos ? kv_pos[b * kv_len + t] : t;
    return (causal && kp > qp) || (window >= 0 && kp <= qp - window);
  }
};

// Per-thread buffers of one task.
struct Scratch {
  std::vector<float> q, k, v, bias, scores, m, l, acc;
  std::vector<int64_t> tiles;
  explicit Scratch(const Problem& p)
      : q(p.rows() * p.dim), k(kTile * p.dim), v(kTile * p.dim), bias(p.rows() * kTile),
        scores(p.rows() * kTile), m(p.rows()), l(p.rows()), acc(p.rows() * p.dim) {}
};

// Whether mask row `row` shows key t0 + i for some i < n (its bias is not -inf). Contiguous rows
// are read as a byte search (bool) or a branch-free reduction (float) that the compiler vectorizes:
// a hidden tile is probed at every one of its keys in every row, and a prefill of 64 queries over a
// 32K-slot cache has 2M such probes per KV head.
bool row_shows(const Mask& m, int64_t row, int64_t t0, int64_t n) {
  if (m.sl == 1 && m.flags != nullptr) return std::memchr(m.flags + row + t0, 1, n) != nullptr;
  if (m.sl == 1) {  // -inf's bit pattern compared as integers: a loop without branches or FP flags
    const auto* x = reinterpret_cast<const uint32_t*>(m.values + row + t0);
    uint32_t shown = 0;
    for (int64_t t = 0; t < n; ++t) shown |= static_cast<uint32_t>(x[t] != kNegInfBits);
    return shown != 0;
  }
  for (int64_t t = t0; t < t0 + n; ++t)
    if (m.bias(row + t * m.sl) != kNegInf) return true;
  return false;
}

// Whether any query row of KV head h sees any of keys [t0, t0 + n) (see [Note: skipping hidden
// tiles]). Rows that differ only in their head share a mask row when the mask broadcasts over heads.
bool tile_visible(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t n) {
  const int64_t rows = p.mask.sh == 0 || !p.mask.any() ? p.q_len : p.rows();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = p.mask.any() ? p.mask_row(b, h, r) : 0;
    if (!p.positional()) {
      if (row_shows(p.mask, row, t0, n)) return true;
      continue;
    }
    for (int64_t t = t0; t < t0 + n; ++t) {
      if (p.hidden_by_position(b, r, t)) continue;
      if (!p.mask.any() || p.mask.bias(row + t * p.mask.sl) != kNegInf) return true;
    }
  }
  return false;
}

// Whether a bool mask shows every key of [t0, t0 + n) to every row and nothing else hides one (a
// byte search per distinct mask row: most tiles of a padding or static-cache mask are so).
bool all_shown(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t n) {
  if (p.positional() || p.mask.flags == nullptr || p.mask.sl != 1) return false;
  const int64_t rows = p.mask.sh == 0 ? p.q_len : p.rows();
  for (int64_t r = 0; r < rows; ++r) {
    if (std::memchr(p.mask.flags + p.mask_row(b, h, r) + t0, 0, n) != nullptr) return false;
  }
  return true;
}

// Fills the additive mask of one tile [rows, n]; returns false when it is all 0 (nothing to add).
bool fill_bias(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t n, float* bias) {
  if (all_shown(p, b, h, t0, n)) return false;
  bool any = false;
  for (int64_t r = 0; r < p.rows(); ++r) {
    const int64_t row = p.mask.any() ? p.mask_row(b, h, r) : 0;
    for (int64_t t = 0; t < n; ++t) {
      float x = p.hidden_by_position(b, r, t0 + t) ? kNegInf : 0.f;
      if (x == 0.f && p.mask.any()) x = p.mask.bias(row + (t0 + t) * p.mask.sl);
      bias[r * n + t] = x;
      any = any || x != 0.f;
    }
  }
  return any;
}

// The tiles (indices, kTile keys each) that one split of (b, h) reads: its share of the visible
// tiles when `visible` marks them (one byte per tile), else of all tiles of the row's valid keys.
void split_tiles(const Problem& p, int64_t len, const uint8_t* visible, int64_t split, std::vector<int64_t>& out) {
  const int64_t n_tiles = (len + kTile - 1) / kTile;
  int64_t count = n_tiles;
  if (visible != nullptr) count = std::count(visible, visible + n_tiles, uint8_t{1});
  const int64_t chunk = (count + p.splits - 1) / p.splits, first = split * chunk, last = first + chunk;
  out.clear();
  for (int64_t i = 0, rank = 0; i < n_tiles && rank < last; ++i) {
    if (visible != nullptr && !visible[i]) continue;
    if (rank++ >= first) out.push_back(i);
  }
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
              int64_t h, int64_t split, const uint8_t* visible, Scratch& s, float* out, float* lse) {
  const int64_t len = p.length(b);
  split_tiles(p, len, visible, split, s.tiles);
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
  const auto keys_of = [&](size_t i) { return std::min(kTile, len - s.tiles[i] * kTile); };
  for (size_t i = 0; i < s.tiles.size(); ++i) {
    const int64_t t0 = s.tiles[i] * kTile, n = keys_of(i);
    if (i + 1 < s.tiles.size()) {
      const int64_t next = s.tiles[i + 1] * kTile;
      prefetch_tile(kd + next * k.stride(2), k.stride(2), keys_of(i + 1), p.dim);
      prefetch_tile(vd + next * v.stride(2), v.stride(2), keys_of(i + 1), p.dim);
    }
    TileArgs a{};
    a.q = s.q.data();
    a.k = tile_rows(kd + t0 * k.stride(2), k.stride(2), n, p.dim, s.k.data(), a.ld_k);
    a.v = tile_rows(vd + t0 * v.stride(2), v.stride(2), n, p.dim, s.v.data(), a.ld_v);
    a.bias = p.masked() && fill_bias(p, b, h, t0, n, s.bias.data()) ? s.bias.data() : nullptr;
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

// attn_mask as a Mask over its expansion to [B, Hq, Sq, L]; `keep` holds the float32 copy of a
// non-float32 additive mask (made at the mask's own shape, never at the broadcast one).
Mask make_mask(const std::optional<at::Tensor>& attn_mask, const Problem& p, at::Tensor& keep) {
  Mask m;
  if (!attn_mask) return m;
  const bool flags = attn_mask->scalar_type() == at::kBool;
  keep = *attn_mask;
  for (int64_t d = 0; d < keep.dim(); ++d)  // an expanded mask converts at its own size
    if (keep.stride(d) == 0 && keep.size(d) > 1) keep = keep.narrow(d, 0, 1);
  if (!flags && keep.scalar_type() != at::kFloat) keep = keep.to(at::kFloat);
  const auto full = keep.expand({p.batch, p.q_heads, p.q_len, p.kv_len});
  if (flags) m.flags = full.const_data_ptr<bool>();
  else m.values = full.const_data_ptr<float>();
  m.sb = full.stride(0), m.sh = full.stride(1), m.sq = full.stride(2), m.sl = full.stride(3);
  return m;
}

// [B, Hkv, n_tiles] bytes, 1 where some query row of (b, h) sees a key of the tile (see [Note:
// skipping hidden tiles]); empty when nothing is masked (every tile of the valid keys is read).
std::vector<uint8_t> visible_tiles(const Problem& p) {
  std::vector<uint8_t> visible;
  if (!p.masked()) return visible;
  const int64_t n_tiles = (p.kv_len + kTile - 1) / kTile;
  visible.assign(p.batch * p.kv_heads * n_tiles, 0);
  // A mask broadcast over heads (or none) shows every KV head of a batch row the same tiles: the
  // first head's are computed and copied to the others. A hidden tile costs a probe per key and
  // distinct mask row, a visible one about one: a thread takes tiles worth ~64K probes.
  const bool per_head = p.mask.any() && p.mask.sh != 0;
  const int64_t heads = per_head ? p.kv_heads : 1;
  const int64_t rows = per_head ? p.rows() : p.q_len;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, rows * kTile));
  at::parallel_for(0, p.batch * heads * n_tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx % n_tiles, b = idx / n_tiles / heads, h = idx / n_tiles % heads;
      const int64_t len = p.length(b);
      if (i * kTile < len)
        visible[(b * p.kv_heads + h) * n_tiles + i] = tile_visible(p, b, h, i * kTile, std::min(kTile, len - i * kTile));
    }
  });
  for (int64_t b = 0; !per_head && b < p.batch; ++b)
    for (int64_t other = 1; other < p.kv_heads; ++other)
      std::copy_n(visible.begin() + b * p.kv_heads * n_tiles, n_tiles,
                  visible.begin() + (b * p.kv_heads + other) * n_tiles);
  return visible;
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const std::optional<at::Tensor>& kv_lens,
                                                        const std::optional<at::Tensor>& kv_pos,
                                                        const std::optional<at::Tensor>& q_pos, double scale,
                                                        double softcap, bool is_causal, int64_t window,
                                                        int64_t num_splits, const std::optional<at::Tensor>& attn_mask) {
  check_decode_args(q, k, v, kv_lens, kv_pos, q_pos, scale, softcap, is_causal, window, num_splits, attn_mask);
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
            qpos ? qpos->const_data_ptr<int64_t>() : nullptr, Mask{}};
  at::Tensor mask_storage;
  p.mask = make_mask(attn_mask, p, mask_storage);
  const int64_t tasks = p.batch * p.kv_heads, n_tiles = (p.kv_len + kTile - 1) / kTile;
  p.splits = choose_splits(num_splits, tasks, p.kv_len);
  const std::vector<uint8_t> visible = visible_tiles(p);
  const int64_t rows = p.batch * p.q_heads * p.q_len;
  auto f32 = q.options().dtype(at::kFloat);
  auto out = at::empty({p.splits, rows, p.dim}, f32);
  auto lse = at::empty({p.splits, rows}, f32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention_cpu", [&] {
    at::parallel_for(0, tasks * p.splits, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch(p);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t split = i % p.splits, bh = i / p.splits;
        const uint8_t* tiles = visible.empty() ? nullptr : visible.data() + bh * n_tiles;
        run_task<scalar_t>(p, qc, kc, vc, bh / p.kv_heads, bh % p.kv_heads, split, tiles, scratch,
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
