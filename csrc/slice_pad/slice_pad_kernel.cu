// CUDA kernel for lowrank_kernels::pad_slices: one launch writes every output element once
// (its slice's value or zero), so no separate memset pass over the padded tensor is needed.
// Only c10 CUDA headers: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers we do not use.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "slice_pad.h"

namespace lowrank_kernels {

// The copy is by element width, not dtype: fp16/bf16 move as uint16, fp32 as uint32, fp64 as uint64.
template <typename T>
__global__ void pad_slices_kernel(T* __restrict__ out, const int64_t* __restrict__ src_ptrs,
                                  const int64_t* __restrict__ starts, const int64_t* __restrict__ lens,
                                  const int32_t* __restrict__ row_slice, int64_t full_size, int64_t inner,
                                  int64_t total) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t i = idx % inner;
    const int64_t line = idx / inner;
    const int64_t row = line % full_size;
    const int64_t o = line / full_size;
    const int32_t s = row_slice[row];
    T value = T(0);
    if (s >= 0) {
      const T* src = reinterpret_cast<const T*>(src_ptrs[s]);
      value = src[(o * lens[s] + (row - starts[s])) * inner + i];
    }
    out[idx] = value;
  }
}

at::Tensor pad_slices_cuda(const std::vector<at::Tensor>& grads_in, at::IntArrayRef starts, at::IntArrayRef stops,
                           int64_t full_size, int64_t dim) {
  // Checked before the contiguous copies: a huge expand()-ed grad is refused, not materialised.
  std::vector<at::Tensor> grads(grads_in.begin(), grads_in.end());
  const SliceGeometry geo = check_pad_args(grads, starts, stops, full_size, dim);
  for (auto& g : grads) g = g.contiguous();
  TORCH_CHECK_TYPE(grads[0].is_cuda(), "pad_slices CUDA kernel got a tensor on ", grads[0].device());
  const c10::cuda::CUDAGuard guard(grads[0].device());
  auto out = at::empty(geo.out_shape, grads[0].options());
  const int64_t n = static_cast<int64_t>(grads.size());
  // Table [ptrs | starts | lens] and the row -> slice map, built on the host and copied once.
  auto table = at::empty({3 * n}, at::TensorOptions().dtype(at::kLong));
  auto row_slice = at::full({full_size}, -1, at::TensorOptions().dtype(at::kInt));
  int64_t* t = table.data_ptr<int64_t>();
  int32_t* rs = row_slice.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    t[i] = reinterpret_cast<int64_t>(grads[i].data_ptr());
    t[n + i] = starts[i];
    t[2 * n + i] = stops[i] - starts[i];
    for (int64_t r = starts[i]; r < stops[i]; ++r) rs[r] = static_cast<int32_t>(i);
  }
  auto table_d = table.to(out.device(), /*non_blocking=*/false);
  auto row_slice_d = row_slice.to(out.device(), /*non_blocking=*/false);
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535LL * 8);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* tp = table_d.data_ptr<int64_t>();
  const int32_t* rp = row_slice_d.data_ptr<int32_t>();
  switch (out.element_size()) {
    case 2:
      pad_slices_kernel<uint16_t><<<blocks, threads, 0, stream>>>(
          static_cast<uint16_t*>(out.data_ptr()), tp, tp + n, tp + 2 * n, rp, full_size, geo.inner, total);
      break;
    case 4:
      pad_slices_kernel<uint32_t><<<blocks, threads, 0, stream>>>(
          static_cast<uint32_t*>(out.data_ptr()), tp, tp + n, tp + 2 * n, rp, full_size, geo.inner, total);
      break;
    case 8:
      pad_slices_kernel<uint64_t><<<blocks, threads, 0, stream>>>(
          static_cast<uint64_t*>(out.data_ptr()), tp, tp + n, tp + 2 * n, rp, full_size, geo.inner, total);
      break;
    default:
      TORCH_CHECK(false, "pad_slices: unsupported element size ", out.element_size());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

static at::Tensor pad_slices_cuda_entry(at::TensorList grads, at::IntArrayRef starts, at::IntArrayRef stops,
                                        int64_t full_size, int64_t dim) {
  return pad_slices_cuda(grads.vec(), starts, stops, full_size, dim);
}

TORCH_LIBRARY_IMPL(lowrank_kernels, CUDA, m) {
  m.impl("pad_slices", &pad_slices_cuda_entry);
  m.impl("gather_slices", &gather_slices_impl);
}

}  // namespace lowrank_kernels
