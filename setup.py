"""Build fastrl and its C++ extension ``fastrl._C``.

The CPU sources (``csrc/*.cpp``) are always built. The CUDA sources (``csrc/cuda/*.cu``: kernels,
and ``csrc/cuda/*.cpp``: their torch glue) are added when the installed torch has CUDA and nvcc is
found; set ``FASTRL_NO_CUDA=1`` to skip them.
Build against the installed torch: ``pip install -e . --no-build-isolation``.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
# nvcc flags of the CUDA sources (tests/test_gpu_compile.py compiles them with the same ones). No
# --use_fast_math: the sampler's log-probs use precise logf and must not flush denormals.
NVCC_FLAGS = ["-O3", "-lineinfo", "-std=c++17"]


def _rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extension():
    cpp_sources = _rel("csrc/*.cpp")
    cuda_sources = _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    want_cuda = (
        os.environ.get("FASTRL_NO_CUDA", "0") != "1"
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and bool(cuda_sources)
    )
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if want_cuda:
        return CUDAExtension(
            "fastrl._C",
            cpp_sources + cuda_sources,
            define_macros=[("FASTRL_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx,
                "nvcc": NVCC_FLAGS,
            },
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "fastrl._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["fastrl", "fastrl.*"]) + ["fastrl.kernels"],
    package_dir={"fastrl.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
