"""Build focal_cuda: one extension module, focal_cuda._C.

Environment knobs:
  FORCE_CUDA=1            build the CUDA kernels even when no toolkit is detected (fails if none).
  FORCE_CPU=1             build the CPU kernels only.
  CUDA_HOME               CUDA toolkit root; otherwise the real location behind `nvcc`, then
                          /usr/local/cuda.
  TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "8.0;9.0+PTX"; default: the visible GPUs, or
                          DEFAULT_CUDA_ARCHS below when none is visible.
  MAX_JOBS                parallel compile jobs (ninja).

The extension is built against the torch that setup.py imports: under pip, the environment's own
torch, also with build isolation (build_backend/focal_backend.py). Without torch (an sdist, or
metadata only) the package description still works; compiling then stops with what to install.
"""

import concurrent.futures
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
# The oldest torch the suite has passed with (2.11.0, CPU build); 2.5.1 does not compile the CPU
# kernels (its at::vec has no unary minus nor fnmadd).
MIN_TORCH = (2, 11)
# Written next to the built extension: the torch it was compiled against, which
# focal_cuda/__init__.py compares with the running torch before loading the extension.
BUILD_RECORD = "_build.json"
# Turing, Ampere and Hopper (H100/H200) as cubins, plus Hopper PTX that newer GPUs JIT-compile.
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX"


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home():
    """CUDA_HOME, else the toolkit that `nvcc` really runs from, else /usr/local/cuda.

    PyTorch guesses CUDA_HOME as the parent of the `nvcc` on PATH, which is wrong when that
    `nvcc` is a wrapper script (e.g. /usr/local/bin/nvcc exec-ing the real one); nvcc's own
    dry run names its installation directory, so ask it.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            dry_run = subprocess.run(
                [nvcc, "-dryrun", "--version"], capture_output=True, text=True, timeout=60
            )
            match = re.search(r"^#\$ TOP=(.+)$", dry_run.stdout + dry_run.stderr, re.M)
            if match:
                top = Path(match.group(1).strip()).resolve()
                if (top / "bin" / "nvcc").exists():
                    return str(top)
        except (OSError, subprocess.SubprocessError):
            pass
        candidate = Path(os.path.realpath(nvcc)).parent.parent
        if (candidate / "include" / "cuda_runtime.h").exists():
            return str(candidate)
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    return None


def read_version():
    text = (ROOT / "focal_cuda" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


FORCE_CUDA = env_flag("FORCE_CUDA")
FORCE_CPU = env_flag("FORCE_CPU")
if FORCE_CUDA and FORCE_CPU:
    sys.exit("setup.py: FORCE_CUDA=1 and FORCE_CPU=1 contradict each other; set one of them.")

CUDA_HOME = None if FORCE_CPU else find_cuda_home()
if CUDA_HOME:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    os.environ["CUDA_HOME"] = CUDA_HOME

try:
    import torch  # noqa: E402
    from torch.utils.cpp_extension import (  # noqa: E402
        BuildExtension,
        CppExtension,
        CUDAExtension,
        include_paths,
    )
except ImportError:  # enough for an sdist or the metadata; FocalBuildExtension.run stops
    torch = None
    BuildExtension = build_ext

def decide_cuda():
    if torch is None:
        return False, "torch is not installed"
    if FORCE_CPU:
        return False, "FORCE_CPU=1"
    if torch.version.cuda is None:
        if FORCE_CUDA:
            sys.exit(
                f"setup.py: FORCE_CUDA=1 but the installed torch {torch.__version__} is a CPU-only "
                "build; install a CUDA build of torch first."
            )
        return False, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None:
        if FORCE_CUDA:
            sys.exit("setup.py: FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME.")
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"toolkit at {CUDA_HOME}"


WITH_CUDA, CUDA_REASON = decide_cuda()
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps) + "+PTX"
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
CUDA_ARCHS = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if WITH_CUDA else ""

# The CPU kernels are compiled once per instruction set and chosen at run time: the default
# extension flags enable no AVX, which would leave at::vec::Vectorized (and its SLEEF exp/log)
# running lane by lane. Flags follow how PyTorch builds its own per-ISA kernels.
CPU_KERNEL_SOURCES = ["csrc/cpu/focal_cpu_kernels.cpp", "csrc/cpu/softmax_cpu_kernels.cpp"]
if platform.machine().lower() in ("x86_64", "amd64"):
    CPU_ISA_FLAGS = {
        "DEFAULT": ["-DFOCAL_CPU_ISA=DEFAULT"],
        "AVX2": ["-DFOCAL_CPU_ISA=AVX2", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
                 "-mavx2", "-mfma", "-mf16c"],
        "AVX512": ["-DFOCAL_CPU_ISA=AVX512", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
                   "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    }
else:
    CPU_ISA_FLAGS = {"DEFAULT": ["-DFOCAL_CPU_ISA=DEFAULT"]}

OPENMP_FLAGS = [] if sys.platform == "darwin" else ["-fopenmp"]
# -g1 after Python's -g: line tables and function names for backtraces, without the full debug
# information that took a third of every C++ object's compile time. The C++ standard is the one
# torch asks for.
CXX_FLAGS = ["-O3", "-g1"] + OPENMP_FLAGS
# gcc 12 reports its own AVX-512 intrinsics (the _mm512_undefined_* idiom in avx512fintrin.h)
# as uninitialized or maybe-uninitialized once inlined into at::vec (GCC bug 105593; which of
# the two depends on inlining): ~200 warnings that are not ours. Off for the AVX-512 variant
# only; the other variants compile the same source with the warnings on.
if "AVX512" in CPU_ISA_FLAGS:
    CPU_ISA_FLAGS["AVX512"] += ["-Wno-maybe-uninitialized", "-Wno-uninitialized"]
# No --use_fast_math: each kernel chooses its approximations (ex2.approx, rcp.approx, its own
# log1p) where their error bounds allow, and the accurate functions elsewhere (README, "16-bit
# results on CUDA").
NVCC_FLAGS = ["-O3", "-lineinfo"]

DEFINES = [
    ("FOCAL_CUDA_VERSION_STR", f'"{read_version()}"'),
    ("FOCAL_CUDA_ARCH_LIST", f'"{CUDA_ARCHS}"'),
    ("FOCAL_CPU_ISAS", '"' + ",".join(CPU_ISA_FLAGS) + '"'),
]
for isa in CPU_ISA_FLAGS:
    DEFINES.append((f"FOCAL_HAVE_CPU_{isa}", "1"))

sources = ["csrc/bindings.cpp", "csrc/focal_ops.cpp", "csrc/cpu/focal_cpu.cpp"]
if WITH_CUDA:
    # The forward kernels in one file per inputs dtype (the 16-bit ones' labels in another):
    # ninja compiles them in parallel.
    sources += ["csrc/cuda/focal_cuda.cu", "csrc/cuda/softmax.cu"] + [
        f"csrc/cuda/forward_{name}.cu"
        for name in ("float16", "float16_labels", "bfloat16", "bfloat16_labels", "float32", "float64")
    ]
    DEFINES.append(("FOCAL_WITH_CUDA", "1"))


def torch_version_tuple(version):
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())


if torch is not None:
    if torch_version_tuple(torch.__version__) < MIN_TORCH:
        minimum = ".".join(map(str, MIN_TORCH))
        sys.exit(
            f"setup.py: focal_cuda needs torch >= {minimum}, found torch {torch.__version__} at "
            f"{os.path.dirname(torch.__file__)}; upgrade it (`python -m pip install "
            f"'torch>={minimum}'`) and build again."
        )
    # torch's headers as system headers for the C++ compiles, so that their warnings (unknown
    # `#pragma unroll` in at::vec, ~70 per build) do not bury ours; -I of the same directory,
    # which torch adds, is then ignored by gcc and clang. nvcc's flags are left as they are.
    for directory in include_paths():
        CXX_FLAGS += ["-isystem", directory]


def write_build_record(package_dir):
    record = {"torch_version": torch.__version__}
    Path(package_dir, BUILD_RECORD).write_text(json.dumps(record) + "\n")


class FocalBuildExtension(BuildExtension):
    """BuildExtension that also compiles the CPU kernel source once per instruction set, and
    records the torch it compiled against beside the extension."""

    def run(self):
        if torch is None:
            sys.exit(
                "setup.py: compiling focal_cuda needs torch in the environment it builds in, and "
                f"`import torch` fails there ({sys.executable}). Install torch first "
                "(`python -m pip install -r requirements.txt`), then build again; `pip install .` "
                "with build isolation builds against the torch of the environment it installs into."
            )
        super().run()
        write_build_record(os.path.join(self.build_lib, "focal_cuda"))
        if self.inplace:  # an editable install imports the extension from the source tree
            write_build_record(self.get_finalized_command("build_py").get_package_dir("focal_cuda"))

    def build_extension(self, ext):
        # One object per instruction set, each a compile of its own (its flags differ from the
        # other sources'), then the other sources, which ninja spreads over MAX_JOBS (the forward
        # kernels in one file per inputs dtype, the 16-bit labels apart). Instruction sets at
        # once: as many as the jobs keep busy, each compiling its sources in parallel (all three
        # on two cores ran six compilers, each object taking three times as long).
        jobs = os.environ.get("MAX_JOBS", "")
        jobs = int(jobs) if jobs.isdigit() else (os.cpu_count() or 1)
        at_once = max(1, min(len(CPU_ISA_FLAGS), jobs // len(CPU_KERNEL_SOURCES)))

        def compile_for(isa):
            cxx_flags = ext.extra_compile_args["cxx"] + CPU_ISA_FLAGS[isa]
            return self.compiler.compile(
                CPU_KERNEL_SOURCES,
                output_dir=os.path.join(self.build_temp, f"isa_{isa.lower()}"),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": cxx_flags, "nvcc": []} if self.use_ninja else cxx_flags,
                depends=ext.depends,
            )

        with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
            for objects in pool.map(compile_for, CPU_ISA_FLAGS):
                ext.extra_objects += objects
        super().build_extension(ext)

if torch is not None:
    print(
        "focal_cuda build configuration:\n"
        f"  torch {torch.__version__} (CUDA {torch.version.cuda}) at {os.path.dirname(torch.__file__)}\n"
        f"  CUDA kernels: {'yes' if WITH_CUDA else 'no'} ({CUDA_REASON})\n"
        f"  CUDA architectures: {CUDA_ARCHS or '-'}\n"
        f"  CPU kernels: {', '.join(CPU_ISA_FLAGS)} (chosen at run time)\n"
        f"  MAX_JOBS: {os.environ.get('MAX_JOBS', 'default')}",
        flush=True,
    )
    extension_cls = CUDAExtension if WITH_CUDA else CppExtension
    # The wheel runs only with the torch it was compiled against: require that release (any
    # local build label, +cpu or +cu130, matches; focal_cuda/__init__.py checks the label).
    torch_requirement = "torch==" + torch.__version__.split("+")[0]
else:
    extension_cls = Extension
    torch_requirement = "torch>=" + ".".join(map(str, MIN_TORCH))  # an sdist's metadata

extension = extension_cls(
    name="focal_cuda._C",
    sources=sources,
    include_dirs=[str(ROOT / "csrc")],
    define_macros=DEFINES,
    # Relative, so that an sdist lists them too.
    depends=[p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "csrc").rglob("*.h"))]
    + [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "csrc").rglob("*.cuh"))]
    + CPU_KERNEL_SOURCES,
    extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    extra_link_args=OPENMP_FLAGS,
)

setup(
    name="focal_cuda",
    version=read_version(),
    description="Fused sigmoid focal loss (RetinaNet) with analytic gradient, CUDA and CPU kernels",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    author="The focal_cuda maintainers",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    keywords=["focal loss", "RetinaNet", "object detection", "pytorch", "cuda", "extension"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Environment :: GPU :: NVIDIA CUDA",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Typing :: Typed",
    ],
    packages=["focal_cuda"],
    package_data={"focal_cuda": ["py.typed"]},
    python_requires=">=3.9",
    # numpy: torch warns "Failed to initialize NumPy" on import without it.
    install_requires=[torch_requirement, "numpy"],
    ext_modules=[extension],
    cmdclass={"build_ext": FocalBuildExtension},
    zip_safe=False,
)
