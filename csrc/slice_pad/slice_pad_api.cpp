// lowrank_kernels::pad_slices / gather_slices: schema, argument checks and the CPU kernel.
//
// pad_slices writes each grads[i] into [starts[i], stops[i]) along `dim` of a zero tensor of size
// `full_size` along `dim`; this is how a fused (QKV) weight receives per-slice gradients without
// being split. gather_slices is its inverse (and its backward).
#include <Python.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <numeric>

#include "slice_pad.h"

#ifdef WITH_CUDA
#define LK_WITH_CUDA 1
#else
#define LK_WITH_CUDA 0
#endif

extern "C" {
// A bare module: importing it runs the static TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "lowrank_kernels compiled ops", -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m != nullptr) PyModule_AddIntConstant(m, "WITH_CUDA", LK_WITH_CUDA);
  return m;
}
}

namespace lowrank_kernels {

static void check_slice_list(at::IntArrayRef starts, at::IntArrayRef stops, int64_t full_size, size_t n) {
  TORCH_CHECK_VALUE(starts.size() == n && stops.size() == n, "expected ", n, " slices, got ", starts.size(),
                    " starts and ", stops.size(), " stops");
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(0 <= starts[i] && starts[i] < stops[i] && stops[i] <= full_size, "slice ", i, " = (",
                      starts[i], ", ", stops[i], ") is empty, reversed or outside [0, ", full_size, ")");
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return starts[a] < starts[b]; });
  for (size_t k = 1; k < n; ++k) {
    const size_t prev = order[k - 1], cur = order[k];
    TORCH_CHECK_VALUE(starts[cur] >= stops[prev], "slices ", prev, " = (", starts[prev], ", ", stops[prev],
                      ") and ", cur, " = (", starts[cur], ", ", stops[cur], ") overlap");
  }
}

SliceGeometry check_pad_args(const std::vector<at::Tensor>& grads, at::IntArrayRef starts, at::IntArrayRef stops,
                             int64_t full_size, int64_t dim) {
  TORCH_CHECK_VALUE(!grads.empty(), "pad_slices needs at least one grad");
  TORCH_CHECK_VALUE(full_size > 0, "full_size must be positive, got ", full_size);
  TORCH_CHECK_VALUE(full_size <= kMaxNumel, "full_size=", full_size, " exceeds the limit of ", kMaxNumel);
  const auto& g0 = grads[0];
  const int64_t ndim = g0.dim();
  TORCH_CHECK_VALUE(ndim >= 1, "grads must have at least 1 dim");
  TORCH_CHECK_VALUE(0 <= dim && dim < ndim, "dim ", dim, " out of range for ", ndim, "-D grads");
  check_slice_list(starts, stops, full_size, grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    TORCH_CHECK_TYPE(g.device() == g0.device(), "grads[", i, "] is on ", g.device(), " but grads[0] is on ",
                     g0.device());
    TORCH_CHECK_TYPE(g.scalar_type() == g0.scalar_type(), "grads[", i, "] has dtype ", g.scalar_type(),
                     " but grads[0] has ", g0.scalar_type());
    TORCH_CHECK_VALUE(g.dim() == ndim, "grads[", i, "] has ", g.dim(), " dims, grads[0] has ", ndim);
    for (int64_t d = 0; d < ndim; ++d) {
      if (d == dim) {
        TORCH_CHECK_VALUE(g.size(d) == stops[i] - starts[i], "grads[", i, "] has size ", g.size(d), " along dim ",
                          dim, " but its slice (", starts[i], ", ", stops[i], ") has ", stops[i] - starts[i]);
      } else {
        TORCH_CHECK_VALUE(g.size(d) == g0.size(d), "grads[", i, "] has size ", g.size(d), " along dim ", d,
                          " but grads[0] has ", g0.size(d));
      }
    }
  }
  int64_t numel = full_size;  // the output's, checked without overflow before anything is allocated
  for (int64_t d = 0; d < ndim; ++d) {
    if (d == dim) continue;
    const int64_t s = g0.size(d);
    TORCH_CHECK_VALUE(s == 0 || numel <= kMaxNumel / s, "pad_slices output of shape ", g0.sizes(), " with ",
                      full_size, " along dim ", dim, " exceeds the limit of ", kMaxNumel, " elements");
    numel *= s;
  }
  SliceGeometry geo;
  geo.dim = dim;
  geo.out_shape = g0.sizes().vec();
  geo.out_shape[dim] = full_size;
  geo.outer = 1;
  geo.inner = 1;
  for (int64_t d = 0; d < dim; ++d) geo.outer *= geo.out_shape[d];
  for (int64_t d = dim + 1; d < ndim; ++d) geo.inner *= geo.out_shape[d];
  return geo;
}

int64_t check_gather_args(const at::Tensor& full, at::IntArrayRef starts, at::IntArrayRef stops, int64_t dim) {
  TORCH_CHECK_VALUE(full.dim() >= 1, "full must have at least 1 dim");
  TORCH_CHECK_VALUE(0 <= dim && dim < full.dim(), "dim ", dim, " out of range for a ", full.dim(), "-D tensor");
  TORCH_CHECK_VALUE(!starts.empty(), "gather_slices needs at least one slice");
  check_slice_list(starts, stops, full.size(dim), starts.size());
  return dim;
}

// CPU: each (outer, row) line of `inner` elements is either a memcpy from its slice's grad or zeros,
// so the output is written exactly once and any dtype works (the copy is by bytes).
static at::Tensor pad_slices_cpu(at::TensorList grads_in, at::IntArrayRef starts, at::IntArrayRef stops,
                                 int64_t full_size, int64_t dim) {
  // Checked before the contiguous copies: a huge expand()-ed grad is refused, not materialised.
  std::vector<at::Tensor> grads(grads_in.begin(), grads_in.end());
  const SliceGeometry geo = check_pad_args(grads, starts, stops, full_size, dim);
  for (auto& g : grads) g = g.contiguous();
  TORCH_CHECK_TYPE(grads[0].device().is_cpu(), "pad_slices CPU kernel got a tensor on ", grads[0].device());
  auto out = at::empty(geo.out_shape, grads[0].options());
  std::vector<int64_t> row_slice(full_size, -1);
  for (size_t i = 0; i < grads.size(); ++i)
    for (int64_t r = starts[i]; r < stops[i]; ++r) row_slice[r] = static_cast<int64_t>(i);
  const int64_t line_bytes = geo.inner * static_cast<int64_t>(out.element_size());
  char* out_ptr = static_cast<char*>(out.data_ptr());
  std::vector<const char*> src(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) src[i] = static_cast<const char*>(grads[i].data_ptr());
  const int64_t lines = geo.outer * full_size;
  at::parallel_for(0, lines, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t line = begin; line < end; ++line) {
      const int64_t o = line / full_size, row = line % full_size;
      char* dst = out_ptr + line * line_bytes;
      const int64_t s = row_slice[row];
      if (s < 0) {
        std::memset(dst, 0, line_bytes);
      } else {
        const int64_t len = stops[s] - starts[s];
        std::memcpy(dst, src[s] + (o * len + (row - starts[s])) * line_bytes, line_bytes);
      }
    }
  });
  return out;
}

std::vector<at::Tensor> gather_slices_impl(const at::Tensor& full, at::IntArrayRef starts, at::IntArrayRef stops,
                                           int64_t dim) {
  check_gather_args(full, starts, stops, dim);
  std::vector<at::Tensor> outs;
  outs.reserve(starts.size());
  for (size_t i = 0; i < starts.size(); ++i)
    outs.push_back(full.narrow(dim, starts[i], stops[i] - starts[i]).clone(at::MemoryFormat::Contiguous));
  return outs;
}

TORCH_LIBRARY(lowrank_kernels, m) {
  m.def("pad_slices(Tensor[] grads, int[] starts, int[] stops, int full_size, int dim) -> Tensor");
  m.def("gather_slices(Tensor full, int[] starts, int[] stops, int dim) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) {
  m.impl("pad_slices", &pad_slices_cpu);
  m.impl("gather_slices", &gather_slices_impl);
}

}  // namespace lowrank_kernels
