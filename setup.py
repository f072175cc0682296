"""Build the cnnx._kernels extension: Cython driver + C kernels, OpenMP when the compiler has it."""
import os
import shutil
import sys
import tempfile
import textwrap
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools._distutils.ccompiler import new_compiler
from setuptools._distutils.sysconfig import customize_compiler

OPENMP_PROBE = textwrap.dedent("""
    #include <omp.h>
    int main(void) {
        int total = 0;
        #pragma omp parallel reduction(+:total)
        total += omp_get_thread_num() >= 0;
        return total > 0 ? 0 : 1;
    }
""")


def openmp_flags():
    """Compile and link a tiny OpenMP program; return the flags that made it work, or None."""
    compiler = new_compiler()
    customize_compiler(compiler)
    flags = ["-fopenmp"]
    workdir = tempfile.mkdtemp(prefix="cnnx-omp-probe-")
    try:
        source = os.path.join(workdir, "probe.c")
        with open(source, "w") as f:
            f.write(OPENMP_PROBE)
        objects = compiler.compile([source], output_dir=workdir, extra_postargs=flags)
        compiler.link_executable(objects, "probe", output_dir=workdir, extra_postargs=flags)
        return flags
    except Exception:
        return None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


omp = openmp_flags()
if omp is None:
    warnings.warn(
        "\n\n*** cnnx: the C compiler has no OpenMP: building SERIAL kernels. ***\n"
        "*** cnnx.openmp_enabled() will return False; install libgomp for threads. ***\n",
        stacklevel=1,
    )
    print("WARNING: cnnx builds without OpenMP (serial kernels)", file=sys.stderr)

# -O3 but no -march=native and no -ffast-math: AVX2/FMA code carries target attributes and
# is chosen at run time, so one wheel runs on any x86-64 and results stay IEEE-exact.
compile_args = ["-O3", "-std=gnu11", "-fno-strict-aliasing", "-Wno-unused-function",
                # sqrtf without errno: lets gcc vectorise the optimizer updates (errno is
                # never read)
                "-fno-math-errno"]
compile_args += omp or []
link_args = list(omp or [])

csrc = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".c"))
kernels = Extension(
    "cnnx._kernels",
    sources=["cnnx/_kernels.pyx", *csrc],
    include_dirs=["csrc", np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
                   ("CNNX_OPENMP", "1" if omp else "0")],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    depends=[os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".h")],
)

setup(
    ext_modules=cythonize(
        [kernels],
        compiler_directives={"language_level": 3, "boundscheck": False, "wraparound": False,
                             "cdivision": True, "initializedcheck": False},
        compile_time_env={"CNNX_OPENMP": bool(omp)},
    ),
)
