// Exact merge of attention partial states, shared by the CPU kernels.
//
// [Note: merge of partial states]
// Each of N parts attended the same query to a disjoint slice of the keys and returned its
// normalised output o_n and log-sum-exp lse_n (natural log). With m = max_n lse_n,
//   lse = m + log(sum_n exp(lse_n - m)),   o = sum_n exp(lse_n - lse) * o_n.
// A part with lse_n = -inf (an empty slice) has weight 0; if every part is empty the result is
// o = 0, lse = -inf and never NaN. Accumulation is in float32 (float64 for float64 outputs).
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace torch_cp {

// Merges rows [begin, end) of `out` [n_parts, rows, dim] / `lse` [n_parts, rows] into
// `merged` [rows, dim] / `merged_lse` [rows].
template <typename scalar_t>
inline void merge_rows(const scalar_t* out, const float* lse, scalar_t* merged, float* merged_lse, int64_t n_parts,
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

}  // namespace torch_cp
