"""Every ``csrc/cuda/*.cu`` compiles with nvcc against torch's headers, for sm_80 and sm_90.

Runs wherever ``nvcc`` is found, with or without a GPU and with a CPU-only torch: a CUDA compile
error fails here instead of at install time on a GPU machine. The flags are those torch's
``BuildExtension`` passes to nvcc (its C++ standard, half/bfloat16 operator switches, relaxed
constexpr, extension defines). Both architectures go through one nvcc call per file, and the
files compile in parallel.
"""
from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHITECTURES = ("80", "90")
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)

pytestmark = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC),
                                reason="nvcc not found (on PATH or under CUDA_HOME)")


def cxx_standard() -> str:
    """The -std torch's cpp_extension gives nvcc (c++20 from torch 2.10 on, c++17 before)."""
    return "c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "c++17"


def include_flags() -> list[str]:
    dirs = cpp_extension.include_paths() + [sysconfig.get_paths()["include"], str(ROOT / "csrc")]
    flags = [f"-I{d}" for d in dirs]
    # A CPU-only torch ships c10/cuda without the header its CUDA build generates; its only
    # content (a Windows export switch) does not matter on Linux.
    if not any(Path(d, "c10/cuda/impl/cuda_cmake_macros.h").exists() for d in dirs):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def nvcc_command(source: Path, output: Path) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHITECTURES]
    return [NVCC, "-c", str(source), "-o", str(output), *include_flags(), *cpp_extension.COMMON_NVCC_FLAGS,
            f"-std={cxx_standard()}", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "--compiler-options", "-fPIC",
            "-O3", *gencode]


def compile_source(source: Path, output_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    command = nvcc_command(source, output_dir / f"{source.stem}.o")
    return source, subprocess.run(command, capture_output=True, text=True)


def test_the_cuda_sources_exist():
    assert {p.name for p in SOURCES} >= {"kernel_assembly_cuda.cu", "norm_gate_cuda.cu", "norm_max_pool_cuda.cu"}


def test_every_cuda_source_compiles(tmp_path):
    with ThreadPoolExecutor(max_workers=len(SOURCES)) as pool:  # nvcc runs its phases one by one
        results = list(pool.map(lambda source: compile_source(source, tmp_path), SOURCES))
    failures = [f"{source.name}:\n{result.stdout}{result.stderr}" for source, result in results
                if result.returncode != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
