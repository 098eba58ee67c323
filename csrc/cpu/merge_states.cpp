// Exact merge of attention partial states on the CPU.
//
// [Note: merge of partial states]
// Each of N parts attended the same query to a disjoint slice of the keys and returned its
// normalised output o_n and log-sum-exp lse_n (natural log). With m = max_n lse_n,
//   lse = m + log(sum_n exp(lse_n - m)),   o = sum_n exp(lse_n - lse) * o_n.
// A part with lse_n = -inf (an empty slice) has weight 0; if every part is empty the result is
// o = 0, lse = -inf and never NaN. Accumulation is in float32 (float64 for float64 outputs).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace torch_cp {
namespace {

template <typename scalar_t>
void merge_rows(const scalar_t* out, const float* lse, scalar_t* merged, float* merged_lse, int64_t n_parts,
                int64_t rows, int64_t dim, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> acc(dim);
  std::vector<float> weight(n_parts);
  for (int64_t r = begin; r < end; ++r) {
    float max_lse = -std::numeric_limits<float>::infinity();
    for (int64_t n = 0; n < n_parts; ++n) max_lse = std::max(max_lse, lse[n * rows + r]);
    scalar_t* dst = merged + r * dim;
    if (max_lse == -std::numeric_limits<float>::infinity()) {
      for (int64_t d = 0; d < dim; ++d) dst[d] = scalar_t(0);
      merged_lse[r] = max_lse;
      continue;
    }
    float total = 0.f;
    for (int64_t n = 0; n < n_parts; ++n) {
      weight[n] = std::exp(lse[n * rows + r] - max_lse);
      total += weight[n];
    }
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t n = 0; n < n_parts; ++n) {
      const acc_t w = weight[n] / total;
      if (w == 0.f) continue;
      const scalar_t* src = out + (n * rows + r) * dim;
      for (int64_t d = 0; d < dim; ++d) acc[d] += w * static_cast<acc_t>(src[d]);
    }
    for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
    merged_lse[r] = max_lse + std::log(total);
  }
}

std::tuple<at::Tensor, at::Tensor> merge_states_cpu(const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(out.dim() == 3, "merge_states: out must be [N, M, D], got ", out.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == out.size(0) && lse.size(1) == out.size(1),
              "merge_states: lse must be [N, M] matching out ", out.sizes(), ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "merge_states: lse must be float32, got ", lse.scalar_type());
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
