"""Builds the CUDA emulation and runs its tests (pytest -m cuda_emulation): the emulator's
self-test and the sweep of every CUDA kernel instance.

    python tests/cuda_emulation/sweep.py                 # plain build
    python tests/cuda_emulation/sweep.py --sanitized     # ASan + UBSan build, sanitizer preloaded
    python tests/cuda_emulation/sweep.py -- -x -k labels # anything after -- goes to pytest

Exits with pytest's status.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import cuda_emulation  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sanitized", action="store_true", help="AddressSanitizer + UBSan build")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args()
    variant = "sanitized" if args.sanitized else "plain"
    environment = dict(os.environ, FOCAL_CUDA_EMULATION=variant)

    started = time.monotonic()
    print(f"building the {variant} CUDA emulation (cached after the first build)...", flush=True)
    if variant == "sanitized":
        # The module only loads where the sanitizer runtime is preloaded: build it in such a child.
        environment["LD_PRELOAD"] = cuda_emulation.sanitizer_preload()
        environment.update(cuda_emulation.SANITIZER_ENVIRONMENT)
        build = "import cuda_emulation; cuda_emulation.load()"
        subprocess.run([sys.executable, "-c", build], cwd=HERE.parent, env=environment, check=True)
    else:
        cuda_emulation.load("plain")
    print(f"built in {time.monotonic() - started:.0f} s", flush=True)

    paths = [] if any(not arg.startswith("-") for arg in args.pytest_args) else [str(HERE.parent)]
    # --capture=sys: what the kernels' C code writes to the file descriptors (a fault's kernel,
    # block and thread, a sanitizer's report) reaches the terminal even when the process dies.
    command = [sys.executable, "-m", "pytest", "-m", "cuda_emulation", "-q", "-p", "no:cacheprovider",
               "--capture=sys"]
    command += paths + args.pytest_args
    print("+ " + " ".join(command), flush=True)
    result = subprocess.run(command, env=environment, cwd=HERE.parents[1])
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
