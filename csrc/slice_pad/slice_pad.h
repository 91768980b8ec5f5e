// Sliced gradient padding: shared declarations of the CPU and CUDA implementations.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <vector>

namespace lowrank_kernels {

// Error types follow the Python API: TORCH_CHECK_TYPE -> TypeError (dtype, device), TORCH_CHECK_VALUE ->
// ValueError (slices, shapes, sizes). The fake (meta) kernels in ops/pad_slices.py raise the same.

// Largest output (elements) the op allocates, and largest full_size: the MAX_NUMEL of lowrank_kernels/_checks.py.
constexpr int64_t kMaxNumel = int64_t{1} << 34;

// Geometry of a padded tensor viewed as (outer, full_size, inner) around `dim`.
struct SliceGeometry {
  int64_t dim;
  int64_t outer;
  int64_t inner;
  std::vector<int64_t> out_shape;
};

// Validates grads/slices (TORCH_CHECK before any write) and returns the output geometry.
SliceGeometry check_pad_args(const std::vector<at::Tensor>& grads, at::IntArrayRef starts,
                             at::IntArrayRef stops, int64_t full_size, int64_t dim);

// Validates slices against a full tensor for gather.
int64_t check_gather_args(const at::Tensor& full, at::IntArrayRef starts, at::IntArrayRef stops, int64_t dim);

std::vector<at::Tensor> gather_slices_impl(const at::Tensor& full, at::IntArrayRef starts,
                                           at::IntArrayRef stops, int64_t dim);

#ifdef WITH_CUDA
at::Tensor pad_slices_cuda(const std::vector<at::Tensor>& grads, at::IntArrayRef starts,
                           at::IntArrayRef stops, int64_t full_size, int64_t dim);
#endif

}  // namespace lowrank_kernels
