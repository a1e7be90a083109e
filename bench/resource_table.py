"""Per-kernel resources of the sm_90 build, from ptxas, and the occupancy they allow.

    python -m bench.resource_table [--out bench/results/resources_sm90.md]

Compiles each ``csrc/cuda/*.cu`` to a cubin for sm_90 with the extension's flags and ``-Xptxas -v``
(no GPU needed; ``ccache`` is used when present) and tabulates, per kernel instantiation:
registers, spill stores and loads, stack frame, static shared memory, and the resident blocks
per SM that registers, shared memory and the launch bounds allow (sm_90: 64K registers, 228 KiB
of shared memory, 2048 threads and 32 blocks per SM; 1 KiB of shared memory reserved per block).
The dynamic shared memory a launch adds is not in the cubin; it is left out of the occupancy.
``tests/test_resources.py`` fails on any spill and on static shared memory over 48 KiB.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# sm_90 (the CUDA C Programming Guide's table of compute capabilities)
REGISTERS_PER_SM, REGISTERS_PER_THREAD_MAX = 65536, 255
SHARED_PER_SM, SHARED_RESERVED_PER_BLOCK, STATIC_SHARED_MAX = 228 * 1024, 1024, 48 * 1024
THREADS_PER_SM, BLOCKS_PER_SM, WARP_REGISTER_UNIT = 2048, 32, 256


@dataclass
class KernelResources:
    source: str
    kernel: str  # demangled
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    threads: int | None  # launch bound (maximum threads per block), when the kernel declares one

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def blocks_per_sm(self) -> int | None:
        """Resident blocks per SM at ``threads`` threads (None without launch bounds)."""
        if self.threads is None:
            return None
        warps = -(-self.threads // 32)
        regs_per_warp = -(-max(self.registers, 1) * 32 // WARP_REGISTER_UNIT) * WARP_REGISTER_UNIT
        by_regs = REGISTERS_PER_SM // (regs_per_warp * warps)
        by_shared = SHARED_PER_SM // (self.shared + SHARED_RESERVED_PER_BLOCK)
        return min(by_regs, by_shared, THREADS_PER_SM // self.threads, BLOCKS_PER_SM)


def nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(cuda_home, "bin", "nvcc")
    return path if os.path.isfile(path) else shutil.which("nvcc")


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def _constants(text: str) -> dict[str, int]:
    """``constexpr int kName = <expression>;`` of ``text``, each evaluated over the ones before it
    (integer arithmetic on literals and earlier constants only)."""
    constants: dict[str, int] = {}
    for m in re.finditer(r"constexpr int (k\w+) = ([\w\s*+/()-]+);", text):
        expression = re.sub(r"\b(k\w+)\b", lambda n: str(constants.get(n.group(1), "?")), m.group(2))
        if re.fullmatch(r"[\d\s*+/()-]+", expression):
            constants[m.group(1)] = int(eval(expression.replace("/", "//")))  # digits and operators only
    return constants


def _launch_bounds(source_text: str, header_text: str = "") -> dict[str, int]:
    """Kernel name -> the thread count of its ``__launch_bounds__`` (a literal or a constant of the
    file or of the headers: kMmaThreads = kMmaWarps * 32 etc.)."""
    constants = _constants(header_text + "\n" + source_text)
    bounds = {}
    for m in re.finditer(r"__launch_bounds__\((\w+)\)\s*(\w+)\s*\(", source_text):
        value = m.group(1)
        number = int(value) if value.isdigit() else constants.get(value)
        if number is not None:
            bounds[m.group(2)] = number
    return bounds


PTXAS_FUNCTION = re.compile(r"Compiling entry function '(\w+)' for 'sm_90'")
PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers")
PTXAS_SMEM = re.compile(r"(\d+) bytes smem")  # anywhere on the line: a stack size may come before it


def _kernel_name(pretty: str) -> str:
    """``attention_forward_mma`` of ``void ns::(anonymous namespace)::attention_forward_mma<...>(...)``."""
    name = pretty.replace("(anonymous namespace)::", "")
    name = re.sub(r"^void ", "", name).split("<")[0].split("(")[0]
    return name.rsplit("::", 1)[-1]


def parse_ptxas(log: str, source: str, bounds: dict[str, int]) -> list[KernelResources]:
    """The kernels of one ``ptxas -v`` log."""
    kernels, current = [], None
    for line in log.splitlines():
        if m := PTXAS_FUNCTION.search(line):
            current = {"name": m.group(1)}
        elif current is not None and (m := PTXAS_STACK.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := PTXAS_USED.search(line)):
            smem = PTXAS_SMEM.search(line)
            current.update(registers=int(m.group(1)), shared=int(smem.group(1)) if smem else 0)
            kernels.append(current)
            current = None
    names = _demangle([k["name"] for k in kernels])
    rows = []
    for k in kernels:
        pretty = names[k["name"]]
        base = _kernel_name(pretty)
        rows.append(KernelResources(source, pretty, k["registers"], k.get("spill_stores", 0), k.get("spill_loads", 0),
                                    k.get("stack", 0), k["shared"], bounds.get(base)))
    return rows


@functools.cache
def _header_text() -> str:
    """Every kernel header of ``csrc/include/sharedllm``, read once (their constants set launch bounds)."""
    include = os.path.join(ROOT, "csrc", "include", "sharedllm")
    texts = []
    for name in sorted(os.listdir(include)):
        with open(os.path.join(include, name)) as f:
            texts.append(f.read())
    return "\n".join(texts)


def compile_resources(source: str) -> list[KernelResources]:
    """ptxas's resources for every kernel of ``csrc/cuda/<source>`` built for sm_90."""
    compiler = nvcc()
    if compiler is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME)")
    path = os.path.join(ROOT, "csrc", "cuda", source)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [compiler, "-cubin", "-arch=sm_90", "-O3", "--use_fast_math", "-std=c++20", "-Xptxas", "-v",
               "-I", os.path.join(ROOT, "csrc", "include"), path, "-o", os.path.join(tmp, "out.cubin")]
        if shutil.which("ccache"):
            cmd = ["ccache", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{result.stderr[-4000:]}")
    with open(path) as f:
        bounds = _launch_bounds(f.read(), _header_text())
    return parse_ptxas(result.stderr + result.stdout, source, bounds)


def all_resources() -> list[KernelResources]:
    sources = sorted(f for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")) if f.endswith(".cu"))
    return [k for s in sources for k in compile_resources(s)]


def format_table(rows: list[KernelResources]) -> str:
    lines = ["| source | kernel | registers | spill stores / loads (B) | stack (B) | static smem (B) | "
             "threads (launch bound) | blocks / SM |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        blocks = r.blocks_per_sm()
        lines.append(f"| {r.source} | `{r.kernel}` | {r.registers} | {r.spill_stores} / {r.spill_loads} | {r.stack} | "
                     f"{r.shared} | {r.threads or '—'} | {blocks if blocks is not None else '—'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "resources_sm90.md"))
    args = parser.parse_args(argv)
    rows = all_resources()
    text = ("# Kernel resources, sm_90 (ptxas -v)\n\nWritten by `python -m bench.resource_table`; dynamic shared "
            "memory is not included in the occupancy.\n\n" + format_table(rows) + "\n")
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
