"""Static evidence on the CUDA kernels, from the machine code of a build (no GPU needed).

    python bench/sass.py [BINARY]        # default: the installed focal_cuda._C

Prints, for every kernel of the sm_90 cubin: registers, stack and local memory (cuobjdump
-res-usage), and for the forward kernels the grid-stride loop's SASS instructions per element
and its global loads by width (cuobjdump -sass). tests/test_sass.py checks the rules these
numbers must keep; bench/NOTES.md records them per change.

cuobjdump comes with the CUDA toolkit; where the toolkit lacks it, the copy in the triton wheel
(a dependency of Linux builds of torch) reads the same cubins.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ARCH = "sm_90"


def cuobjdump_path():
    """cuobjdump: $CUOBJDUMP, the toolkit's, the one on PATH, or triton's; None if none."""
    candidates = [os.environ.get("CUOBJDUMP")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def demangle(names):
    output = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                            check=True).stdout
    return dict(zip(names, output.splitlines()))


@dataclass
class Kernel:
    name: str  # demangled, namespaces dropped
    registers: int
    stack: int
    local: int
    instructions: list = field(default_factory=list)  # (address, text) of its SASS

    @property
    def template_arguments(self):
        return self.name[self.name.index("<") + 1:self.name.index(">(")]


def _short(demangled):
    return re.sub(r"focal::cuda::\(anonymous namespace\)::|focal::|c10::", "", demangled)


def read_kernels(binary, cuobjdump=None):
    """{short demangled name: Kernel} of the ARCH cubin in binary."""
    cuobjdump = cuobjdump or cuobjdump_path()
    if cuobjdump is None:
        raise FileNotFoundError("no cuobjdump found (set CUOBJDUMP, or install the CUDA toolkit or triton)")
    usage = subprocess.run([cuobjdump, "-res-usage", "-arch", ARCH, str(binary)], capture_output=True,
                           text=True, check=True).stdout
    found = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    sass = subprocess.run([cuobjdump, "-sass", "-arch", ARCH, str(binary)], capture_output=True,
                          text=True, check=True).stdout
    code = {}
    for mangled, body in re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*\.{10,}|\n\s*Function :|\Z)", sass, re.S):
        code[mangled] = [(int(address, 16), text.strip()) for address, text in
                         re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", body)]
    names = demangle([mangled for mangled, *_ in found])
    return {
        _short(names[mangled]): Kernel(_short(names[mangled]), int(reg), int(stack), int(local),
                                       code.get(mangled, []))
        for mangled, reg, stack, local in found
    }


def branch_target(text):
    match = re.search(r"\bBRA(?:\.\S+)? (?:!?U?P\d, )?(0x[0-9a-f]+)", text)
    return int(match.group(1), 16) if match else None


def loops(kernel):
    """The kernel's loops that hold a 128-bit load (the packed grid-stride loops), outermost
    spans: [(first address, last address)]."""
    spans = []
    for address, text in kernel.instructions:
        target = branch_target(text)
        if target is not None and target < address:
            body = [t for a, t in kernel.instructions if target <= a <= address]
            if any("LDG.E.128" in t for t in body):
                spans.append((target, address))
    return [s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans)]


def loop_summary(kernel, pack):
    """[(SASS instructions per element, {load opcode: count})] of each packed grid-stride loop.
    Subroutines the loop calls (IEEE division slow paths, the label report) are not counted."""
    summaries = []
    for first, last in loops(kernel):
        body = [t for a, t in kernel.instructions if first <= a <= last and not t.startswith("NOP")]
        loads = {}
        for text in body:
            opcode = re.search(r"\b(LDG\S*)", text)
            if opcode:
                loads[opcode.group(1)] = loads.get(opcode.group(1), 0) + 1
        summaries.append((len(body) / pack, loads))
    return summaries


def pack_of(kernel):
    return int(kernel.template_arguments.rsplit(",", 1)[1])


def installed_binary():
    import focal_cuda._C

    return Path(focal_cuda._C.__file__)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary", nargs="?", type=Path, help="a built _C*.so or an object file")
    args = parser.parse_args()
    kernels = read_kernels(args.binary or installed_binary())
    if not kernels:
        sys.exit(f"no {ARCH} kernels in the binary (built without CUDA, or not for {ARCH})")
    print(f"{'kernel':<100} {'REG':>4} {'STACK':>5} {'LOCAL':>5}  packed loops: SASS/element, loads")
    for name in sorted(kernels):
        kernel = kernels[name]
        loop_text = ""
        if name.startswith("void focal_forward_kernel") and pack_of(kernel) > 1:
            loop_text = "; ".join(f"{per:.1f}, {loads}" for per, loads in loop_summary(kernel, pack_of(kernel)))
        print(f"{name[5:105]:<100} {kernel.registers:>4} {kernel.stack:>5} {kernel.local:>5}  {loop_text}")


if __name__ == "__main__":
    main()
