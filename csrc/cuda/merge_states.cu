// Exact merge of attention partial states on CUDA; see [Note: merge of partial states] in
// csrc/cpu/merge.h (NaN parts included). One thread block per row; each thread owns a strided slice of D
// and recomputes the (cheap, N-long) weights itself, so no shared memory is needed.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <Python.h>

#include <cmath>
#include <tuple>

extern "C" {
PyObject* PyInit__cuda(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_cuda", "torch_cp CUDA kernels (registered as torch.ops.torch_cp.*)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace torch_cp {
namespace {

template <typename scalar_t>
__global__ void merge_states_kernel(const scalar_t* __restrict__ out, const float* __restrict__ lse,
                                    scalar_t* __restrict__ merged, float* __restrict__ merged_lse, int64_t n_parts,
                                    int64_t rows, int64_t dim) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;
  float max_lse = -INFINITY;
  bool nan_part = false;  // a part with lse NaN or +inf makes the row NaN
  for (int64_t n = 0; n < n_parts; ++n) {
    const float x = lse[n * rows + r];
    nan_part = nan_part || x != x || x == INFINITY;
    max_lse = fmaxf(max_lse, x);
  }
  if (nan_part || max_lse == -INFINITY) {
    const float fill = nan_part ? NAN : 0.f;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) merged[r * dim + d] = static_cast<scalar_t>(fill);
    if (threadIdx.x == 0) merged_lse[r] = nan_part ? NAN : -INFINITY;
    return;
  }
  float total = 0.f;
  for (int64_t n = 0; n < n_parts; ++n) total += expf(lse[n * rows + r] - max_lse);
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    acc_t acc = 0;
    for (int64_t n = 0; n < n_parts; ++n) {
      const float x = lse[n * rows + r];
      if (x == -INFINITY) continue;  // an empty part: its out is never read; any other counts, NaN included
      const acc_t w = expf(x - max_lse) / total;
      acc += w * static_cast<acc_t>(out[(n * rows + r) * dim + d]);
    }
    merged[r * dim + d] = static_cast<scalar_t>(acc);
  }
  if (threadIdx.x == 0) merged_lse[r] = max_lse + logf(total);
}

std::tuple<at::Tensor, at::Tensor> merge_states_cuda(const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(out.dim() == 3, "merge_states: out must be [N, M, D], got ", out.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == out.size(0) && lse.size(1) == out.size(1),
              "merge_states: lse must be [N, M] matching out ", out.sizes(), ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "merge_states: lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == out.device(), "merge_states: out and lse must be on one device");
  TORCH_CHECK(out.is_cuda(), "merge_states (CUDA): out must be a CUDA tensor, got ", out.device());
  const c10::cuda::CUDAGuard guard(out.device());
  const auto o = out.contiguous();
  const auto l = lse.contiguous();
  const int64_t n_parts = o.size(0), rows = o.size(1), dim = o.size(2);
  auto merged = at::empty({rows, dim}, o.options());
  auto merged_lse = at::empty({rows}, l.options());
  if (rows == 0) return {merged, merged_lse};
  const int threads = dim >= 128 ? 128 : 32;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "merge_states_cuda", [&] {
    merge_states_kernel<scalar_t><<<rows, threads, 0, stream>>>(
        o.const_data_ptr<scalar_t>(), l.const_data_ptr<float>(), merged.mutable_data_ptr<scalar_t>(),
        merged_lse.mutable_data_ptr<float>(), n_parts, rows, dim);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {merged, merged_lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cp, CUDA, m) { m.impl("merge_states", &merge_states_cuda); }

}  // namespace torch_cp
