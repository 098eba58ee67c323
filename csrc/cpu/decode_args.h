// Checks of torch_cp::decode_attention's arguments, shared by the CPU and the CUDA kernel.
//
// [Note: decode_attention argument checks]
// The kernels index kv_lens [B], kv_pos [B, L] and q_pos [B] with raw pointers, so a shorter tensor
// would be read past its end. Every argument is checked here, before any kernel runs: q, k, v
// (rank, sizes, one dtype of float32/float16/bfloat16, one device), each optional tensor (exact
// shape, an integer dtype that is not bool, q's device), and the scalars (finite scale, finite
// softcap >= 0, window < 0 or >= 1, num_splits >= 0). Optional tensors of any layout are accepted:
// the kernels read contiguous int64 copies of them. float64 is refused: the kernels compute in
// float32, and torch_cp.attention computes float64 on its float64 reference path instead.
// attn_mask: bool or floating point, on q's device, at most 4-D and broadcastable to [B, Hq, Sq, L]
// (each of its trailing dims 1 or equal); the kernels read it through the strides of its expansion
// (0 on broadcast dims), so a broadcast mask is never materialised.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <vector>

namespace torch_cp {

inline void check_index_tensor(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape,
                               const at::Tensor& q) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->defined(), "decode_attention: ", name, " is an undefined tensor");
  TORCH_CHECK_VALUE(t->sizes() == shape, "decode_attention: ", name, " must have shape ", shape, ", got ",
                    t->sizes());
  TORCH_CHECK_VALUE(at::isIntegralType(t->scalar_type(), /*includeBool=*/false), "decode_attention: ", name,
                    " must be an integer tensor, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == q.device(), "decode_attention: ", name, " is on ", t->device(), " but q is on ",
                    q.device());
}

inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: q, k, v must be 4-D, got ",
                    q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "decode_attention: k ", k.sizes(), " and v ", v.sizes(), " differ");
  TORCH_CHECK_VALUE(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
                    "decode_attention: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
                    ", ", v.scalar_type());
  const auto dtype = q.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                    "decode_attention: q, k, v must be float32, float16 or bfloat16, got ", dtype,
                    " (torch_cp.attention computes float64 on its reference path)");
  TORCH_CHECK_VALUE(q.device() == k.device() && k.device() == v.device(),
                    "decode_attention: q, k, v must be on one device, got ", q.device(), ", ", k.device(), ", ",
                    v.device());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
                    "decode_attention: q ", q.sizes(), " does not match k ", k.sizes(),
                    " (batch and head dim must agree, q heads a multiple of k heads)");
  TORCH_CHECK_VALUE(q.size(3) > 0, "decode_attention: head dim must be >= 1, got q ", q.sizes());
}

inline void check_mask(const std::optional<at::Tensor>& mask, const at::Tensor& q, const at::Tensor& k) {
  if (!mask.has_value()) return;
  TORCH_CHECK_VALUE(mask->defined(), "decode_attention: attn_mask is an undefined tensor");
  const std::vector<int64_t> full{q.size(0), q.size(1), q.size(2), k.size(2)};
  bool broadcastable = mask->dim() <= 4;
  for (int64_t i = 1; broadcastable && i <= mask->dim(); ++i) {
    const int64_t size = mask->size(-i);
    broadcastable = size == 1 || size == full[4 - i];
  }
  TORCH_CHECK_VALUE(broadcastable, "decode_attention: attn_mask of shape ", mask->sizes(),
                    " is not broadcastable to [B, Hq, Sq, L] = ", at::IntArrayRef(full));
  const auto dtype = mask->scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kBool || at::isFloatingType(dtype), "decode_attention: attn_mask (shape ",
                    mask->sizes(), ") must be bool or floating point, got ", dtype);
  TORCH_CHECK_VALUE(mask->device() == q.device(), "decode_attention: attn_mask is on ", mask->device(),
                    " but q is on ", q.device());
}

// See [Note: decode_attention argument checks].
inline void check_decode_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& kv_lens, const std::optional<at::Tensor>& kv_pos,
                              const std::optional<at::Tensor>& q_pos, double scale, double softcap, bool is_causal,
                              int64_t window, int64_t num_splits, const std::optional<at::Tensor>& attn_mask) {
  check_qkv(q, k, v);
  check_mask(attn_mask, q, k);
  TORCH_CHECK_VALUE(std::isfinite(scale), "decode_attention: scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0,
                    "decode_attention: softcap must be finite and >= 0 (0: off), got ", softcap);
  TORCH_CHECK_VALUE(window != 0, "decode_attention: window must be >= 1 (or < 0 for none), got 0");
  TORCH_CHECK_VALUE(num_splits >= 0, "decode_attention: num_splits must be >= 0 (0: automatic), got ", num_splits);
  const int64_t batch = q.size(0), kv_len = k.size(2);
  check_index_tensor(kv_lens, "kv_lens", {batch}, q);
  check_index_tensor(kv_pos, "kv_pos", {batch, kv_len}, q);
  check_index_tensor(q_pos, "q_pos", {batch}, q);
  TORCH_CHECK_VALUE(!(is_causal || window >= 0) || q_pos.has_value(),
                    "decode_attention: q_pos [B] is required with is_causal or window");
}

}  // namespace torch_cp
