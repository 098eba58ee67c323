// Exact merge of attention partial states, shared by the CPU kernels.
//
// [Note: merge of partial states]
// Each of N parts attended the same query to a disjoint slice of the keys and returned its
// normalised output o_n and log-sum-exp lse_n (natural log). With m = max_n lse_n,
//   lse = m + log(sum_n exp(lse_n - m)),   o = sum_n exp(lse_n - lse) * o_n.
// A part with lse_n = -inf (an empty slice) is skipped, whatever its o_n holds; if every part is
// empty the result is o = 0, lse = -inf and never NaN. A part with lse_n NaN or +inf (a NaN row,
// see [Note: NaN rows]) makes the merged row NaN, and so does a NaN in the o_n of a non-empty part,
// however small its weight: a NaN partial never vanishes. Accumulation is in float32 (float64 for
// float64 outputs).
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
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t r = begin; r < end; ++r) {
    float max_lse = kNegInf;
    bool nan_part = false;
    for (int64_t n = 0; n < n_parts; ++n) {
      const float x = lse[n * rows + r];
      nan_part = nan_part || !(x <= std::numeric_limits<float>::max());
      max_lse = std::max(max_lse, x);
    }
    scalar_t* dst = merged + r * dim;
    if (nan_part || max_lse == kNegInf) {
      const float fill = nan_part ? std::numeric_limits<float>::quiet_NaN() : 0.f;
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(fill);
      merged_lse[r] = nan_part ? fill : kNegInf;
      continue;
    }
    float total = 0.f;
    for (int64_t n = 0; n < n_parts; ++n) {
      weight[n] = std::exp(lse[n * rows + r] - max_lse);
      total += weight[n];
    }
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t n = 0; n < n_parts; ++n) {
      if (lse[n * rows + r] == kNegInf) continue;  // empty part; any other part counts, NaN included
      const acc_t w = weight[n] / total;
      const scalar_t* src = out + (n * rows + r) * dim;
      for (int64_t d = 0; d < dim; ++d) acc[d] += w * static_cast<acc_t>(src[d]);
    }
    for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
    merged_lse[r] = max_lse + std::log(total);
  }
}

}  // namespace torch_cp
