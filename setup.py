"""Build script: the Cython/C++ CPU backend and the CUDA sources shipped as package data."""

import os
import shutil
import sys
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
GPU_SOURCES = ROOT / "gpu"


def openmp_flags():
    if sys.platform == "darwin":
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    if sys.platform == "win32":
        return ["/openmp", "/O2"], []
    return ["-fopenmp"], ["-fopenmp"]


class BuildPyWithKernels(build_py):
    """Copy ``gpu/*.cu`` and ``gpu/*.cuh`` into the package so NVRTC finds them once installed."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "pysparse_attn" / "_gpu_kernels"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(GPU_SOURCES.glob("*.cu*")):
            shutil.copy2(source, target / source.name)


compile_args, link_args = openmp_flags()
if sys.platform != "win32":
    compile_args += ["-O3", "-std=c++17", "-ffp-contract=fast"]
    if os.environ.get("PYSPARSE_ATTN_PORTABLE", "0") != "1":
        compile_args += ["-march=native"]

cpu_sources = ["cpu/_cpu.pyx"] + sorted(str(p) for p in (ROOT / "cpu").glob("*.cpp"))
extensions = [
    Extension(
        "pysparse_attn._cpu",
        sources=[os.path.relpath(s, ROOT) if os.path.isabs(s) else s for s in cpu_sources],
        include_dirs=[numpy.get_include(), "cpu"],
        language="c++",
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    ext_modules=cythonize(extensions, language_level=3, build_dir="build/cython"),
    cmdclass={"build_py": BuildPyWithKernels},
)
