"""Build ivl's native extension ``ivl._C`` (metadata lives in pyproject.toml).

- C++ CPU kernels (csrc/cpu) are always built when torch is importable at build time.
- CUDA kernels (csrc/cuda) are added when torch has CUDA, nvcc is found and ``IVL_CUDA != "0"``.
- Without torch at build time the pure-Python package installs alone (ivl.ops falls back to the
  PyTorch reference). pyproject's build requirements deliberately omit torch, so build with
  ``pip install --no-build-isolation -e .`` (``make install``) or, in place,
  ``MAX_JOBS=2 python setup.py build_ext --inplace``.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

# Bit-exact agreement between backends needs a*b + c rounded twice, never fused into an FMA.
# No -march flags: the wheel must run on any x86-64/aarch64 host; plain loops auto-vectorise.
# No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 for torch
# >= 2.10); the framework-free core in csrc/include stays C++17 (see CMakeLists.txt).
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "--fmad=false"]


def _warn(msg: str) -> None:
    print(f"\n*** ivl setup.py: {msg}\n", file=sys.stderr)


def _want_cuda(torch, cpp_extension) -> tuple[bool, str]:
    if os.environ.get("IVL_CUDA") == "0":
        return False, "IVL_CUDA=0"
    if not (torch.version.cuda or torch.cuda.is_available()):
        return False, f"torch {torch.__version__} was built without CUDA"
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"CUDA {torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"


def _native_build() -> dict:
    """setup() arguments for ivl._C, or {} when torch is missing (pure-Python install)."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        _warn(
            f"torch is not importable ({exc}); installing without the native extension ivl._C. "
            "ivl will use its PyTorch reference ops. Install torch first, then rebuild with "
            "`pip install --no-build-isolation -e .` (or `make install`)."
        )
        return {}

    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.abspath("csrc/include")]
    cuda, why = _want_cuda(torch, cpp_extension)
    if cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = cpp_extension.CUDAExtension(
            "ivl._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "ivl._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    print(f"ivl setup.py: building ivl._C with CPU kernels; CUDA kernels: {cuda} ({why})")
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    }


setup(packages=find_packages(include=["ivl*"]), **_native_build())
