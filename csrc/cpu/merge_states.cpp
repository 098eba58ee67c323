// Exact merge of attention partial states on the CPU: the op torch_cp::merge_states.
// The arithmetic is in merge.h, shared with the decode kernel's merge of its splits.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "merge.h"

namespace torch_cp {
namespace {

std::tuple<at::Tensor, at::Tensor> merge_states_cpu(const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(out.dim() == 3, "merge_states: out must be [N, M, D], got ", out.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == out.size(0) && lse.size(1) == out.size(1),
              "merge_states: lse must be [N, M] matching out ", out.sizes(), ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "merge_states: lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == out.device(), "merge_states: out is on ", out.device(), " but lse is on ", lse.device());
  const auto o = out.contiguous();
  const auto l = lse.contiguous();
  const int64_t n_parts = o.size(0), rows = o.size(1), dim = o.size(2);
  auto merged = at::empty({rows, dim}, o.options());
  auto merged_lse = at::empty({rows}, l.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "merge_states_cpu", [&] {
    const auto* o_ptr = o.const_data_ptr<scalar_t>();
    const auto* l_ptr = l.const_data_ptr<float>();
    auto* m_ptr = merged.mutable_data_ptr<scalar_t>();
    auto* ml_ptr = merged_lse.mutable_data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n_parts * dim));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      merge_rows<scalar_t>(o_ptr, l_ptr, m_ptr, ml_ptr, n_parts, rows, dim, begin, end);
    });
  });
  return {merged, merged_lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cp, CPU, m) { m.impl("merge_states", &merge_states_cpu); }

}  // namespace torch_cp
