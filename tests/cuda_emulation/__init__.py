"""The CUDA emulation: the kernel files of csrc/cuda and the op layer compiled for the host against
emulation.h and run on the CPU under CUDA's execution model (docs/cuda-emulation.md).

    module = cuda_emulation.load()          # builds once (~1 min on 2 cores), then cached

Variants (FOCAL_CUDA_EMULATION, or the argument): "plain", and "sanitized" (AddressSanitizer +
UndefinedBehaviorSanitizer with alignment checks), which must run in a process that preloads the
sanitizer runtime: `python tests/cuda_emulation/sweep.py --sanitized` starts one.
"""

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOURCES = ["harness.cpp", "runtime.cpp", "emulated_kernels.cpp", "emulated_ops.cpp", "self_test.cpp"]
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
VARIANT_FLAGS = {
    "plain": ["-O2"],
    "sanitized": ["-O1", "-g"] + SANITIZER_FLAGS,
}
# What the sanitized variant needs in the environment of the process that loads it.
SANITIZER_ENVIRONMENT = {
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


def variant_from_environment():
    variant = os.environ.get("FOCAL_CUDA_EMULATION", "plain")
    if variant not in VARIANT_FLAGS:
        raise ValueError(f"FOCAL_CUDA_EMULATION must be one of {sorted(VARIANT_FLAGS)}, got {variant!r}")
    return variant


def sanitizer_preload():
    """The sanitizer runtimes to preload, as the host compiler names them."""
    import subprocess

    libraries = []
    for name in ("libasan.so", "libubsan.so"):
        path = subprocess.run(["c++", f"-print-file-name={name}"], capture_output=True, text=True,
                              check=True).stdout.strip()
        if not os.path.isabs(path):
            raise RuntimeError(f"the host compiler has no {name} (install its sanitizer runtime)")
        libraries.append(path)
    return ":".join(libraries)


# Launch counts of every kernel instance, recorded by the sweep's last test for the summary
# that tests/conftest.py prints.
launch_counts = None


def coverage_summary(counts):
    """'launched/total' per kernel template, from {instance name: launches}."""
    per_kernel = {}
    for name, launches in counts.items():
        kernel = name.split("<")[0].rsplit("::", 1)[-1]
        launched, total = per_kernel.get(kernel, (0, 0))
        per_kernel[kernel] = (launched + (launches > 0), total + 1)
    launched = sum(launches > 0 for launches in counts.values())
    details = ", ".join(f"{kernel} {done}/{total}" for kernel, (done, total) in sorted(per_kernel.items()))
    return f"{launched}/{len(counts)} kernel instances launched ({details})"


def build_directory(variant):
    """Where the module of `variant` is built (FOCAL_CUDA_EMULATION_BUILD overrides it)."""
    return Path(os.environ.get("FOCAL_CUDA_EMULATION_BUILD") or ROOT / "build" / "cuda_emulation" / variant)


def load(variant=None, verbose=False):
    """Builds (if needed) and imports the emulation module of `variant`, once per process.

    FOCAL_EMULATED_CSRC names a copy of csrc to compile instead, and FOCAL_CUDA_EMULATION_BUILD
    another build directory (the mutation check uses both)."""
    variant = variant or variant_from_environment()
    if variant not in _loaded:
        _loaded[variant] = _build_and_import(variant, verbose)
    return _loaded[variant]


# A second torch.utils.cpp_extension.load of the same module in one process was seen to bump
# its version and rebuild it from scratch (sanitized variant): load each variant once.
_loaded = {}


def _build_and_import(variant, verbose):
    from torch.utils import cpp_extension

    csrc = os.environ.get("FOCAL_EMULATED_CSRC")
    if variant == "sanitized" and "libasan" not in Path("/proc/self/maps").read_text():
        raise RuntimeError(
            "the sanitized CUDA emulation must run in a process that preloads the sanitizer "
            "runtime: use `python tests/cuda_emulation/sweep.py --sanitized`"
        )
    flags = VARIANT_FLAGS[variant] + ["-DFOCAL_WITH_CUDA=1", "-Wno-unused-function"]
    name = f"focal_cuda_emulated_{variant}"
    if csrc is not None:
        name += "_mutant"
    directory = build_directory(variant)
    directory.mkdir(parents=True, exist_ok=True)
    # The build's compilers must not run under the sanitizer this process may preload.
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(HERE / source) for source in SOURCES],
            extra_include_paths=[str(HERE / "shim"), str(HERE), str(Path(csrc or ROOT / "csrc").resolve())],
            extra_cflags=flags,
            extra_ldflags=SANITIZER_FLAGS if variant == "sanitized" else [],
            build_directory=str(directory),
            with_cuda=False,
            verbose=verbose,
        )
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
