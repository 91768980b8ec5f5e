"""Build of the optional compiled extension ``lowrank_kernels._C``.

* The CPU kernel is always built (unless ``LOWRANK_KERNELS_SKIP_EXT=1``: a pure-Python install).
* The CUDA kernel is added when nvcc and a CUDA build of torch are present, or when
  ``FORCE_CUDA=1`` (then set ``TORCH_CUDA_ARCH_LIST``, since no GPU is queried at build time).
* A build that cannot compile CUDA warns and builds the CPU kernel; one that cannot compile at
  all warns and installs the pure-Python package (the ops fall back to their PyTorch references).
* ``MAX_JOBS`` / ``NVCC_THREADS`` are honoured; ninja is used when installed.

torch must already be installed: use ``pip install --no-build-isolation .`` so that pip does not
download a second, multi-GB torch into an isolated build environment.
"""

import glob
import os
import sys
import warnings

from setuptools import setup

SKIP_EXT = os.environ.get("LOWRANK_KERNELS_SKIP_EXT", "0") == "1"
FORCE_CUDA = os.environ.get("FORCE_CUDA", "0") == "1"
# The op uses no CPython API beyond module creation, so one abi3 wheel serves every Python >= 3.10.
LIMITED_API = os.environ.get("LOWRANK_KERNELS_LIMITED_API", "1") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))


def _ext_modules_and_cmdclass():
    if SKIP_EXT:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("torch is not importable at build time: installing without lowrank_kernels._C. "
                      "Install torch first and use `pip install --no-build-isolation`.", stacklevel=1)
        return [], {}

    src_dir = os.path.join("csrc", "slice_pad")
    cpp_sources = sorted(glob.glob(os.path.join(src_dir, "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join(src_dir, "*.cu")))
    has_nvcc = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    with_cuda = FORCE_CUDA or (torch.version.cuda is not None and has_nvcc)
    if FORCE_CUDA and not has_nvcc:
        raise RuntimeError("FORCE_CUDA=1 but nvcc was not found: set CUDA_HOME to the CUDA toolkit folder")
    if not with_cuda:
        reason = "torch is a CPU build" if torch.version.cuda is None else "nvcc / CUDA_HOME not found"
        warnings.warn(f"building lowrank_kernels._C without its CUDA kernel ({reason})", stacklevel=1)

    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++20 for torch >= 2.14).
    debug = os.environ.get("LOWRANK_KERNELS_DEBUG", "0") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    extra = {"cxx": cxx_flags}
    define_macros = []  # py_limited_api=True below makes cpp_extension define Py_LIMITED_API itself
    if with_cuda:
        nvcc_flags = ["-O0", "-g"] if debug else ["-O3", "--use_fast_math"]
        nvcc_threads = os.environ.get("NVCC_THREADS")
        if nvcc_threads:
            nvcc_flags.append(f"--threads={nvcc_threads}")
        extra["nvcc"] = nvcc_flags
        define_macros.append(("WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "lowrank_kernels._C", cpp_sources + cu_sources, extra_compile_args=extra,
            define_macros=define_macros, py_limited_api=LIMITED_API)
    else:
        ext = cpp_extension.CppExtension(
            "lowrank_kernels._C", cpp_sources, extra_compile_args=extra,
            define_macros=define_macros, py_limited_api=LIMITED_API)

    class BuildExt(cpp_extension.BuildExtension):
        """Warn instead of failing: the package works without the extension."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001
                if os.environ.get("LOWRANK_KERNELS_STRICT_BUILD", "0") == "1":
                    raise
                warnings.warn(f"lowrank_kernels._C failed to build ({exc}); the PyTorch fallbacks will be used. "
                              "Set LOWRANK_KERNELS_STRICT_BUILD=1 to make this an error.", stacklevel=1)

    use_ninja = cpp_extension.is_ninja_available()
    return [ext], {"build_ext": BuildExt.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _ext_modules_and_cmdclass()
abi3 = ext_modules and LIMITED_API and sys.version_info >= (3, 10)
setup(ext_modules=ext_modules, cmdclass=cmdclass, options={"bdist_wheel": {"py_limited_api": "cp310"}} if abi3 else {})
