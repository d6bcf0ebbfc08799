"""The project's native decode kernels (csrc/), built for this machine on first use and cached.

The library is compiled once per source, torch and compiler (`build_id` names all three,
and the sanitizer switch) into `<cache dir>/native/`, for the baseline ISA of the machine's
architecture. Its ISA variants (portable, avx2, avx512, avx512-vnni, avx512-bf16) carry their
own target pragmas and run only where the CPU reports their instructions, so a library built on
one machine never executes an instruction another lacks. `ATEN_CPU_CAPABILITY`, which caps
aten's dispatch, caps the variants offered too (an AVX-512 machine posing as AVX2).

Without a compiler, or if the build fails, one line says why and torch's kernels serve.

    BLOOM_RUNTIME_NATIVE=off          build and use nothing native
    BLOOM_RUNTIME_NATIVE_SANITIZE=1   build with -fsanitize=address,undefined (kernel tests: run
                                      with libasan preloaded, see .ci/run)
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..files import replace_atomically
from .selection import Kernel, Problem, default_cache_dir

NATIVE_ENV = "BLOOM_RUNTIME_NATIVE"
SANITIZE_ENV = "BLOOM_RUNTIME_NATIVE_SANITIZE"
SOURCES = Path(__file__).with_name("csrc")
# ATEN_CPU_CAPABILITY's levels, and the variants each allows (above the cap nothing runs).
CAPS = {"default": ("portable",), "avx2": ("portable", "avx2")}


def _sanitized() -> bool:
    return os.environ.get(SANITIZE_ENV, "") not in ("", "0")


def _compiler() -> str | None:
    """$CXX if set (and found), else g++ or c++; None if there is none."""
    given = os.environ.get("CXX")
    return shutil.which(given) if given else shutil.which("g++") or shutil.which("c++")


@functools.cache
def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build_id() -> str:
    """What the library's code depends on: its sources, torch, the compiler and its flags."""
    parts = [torch.__version__, _compiler_version(_compiler() or ""), *_flags(),
             *(p.read_text() for p in sorted(SOURCES.iterdir()))]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def _flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    speed = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-fno-omit-frame-pointer"] if _sanitized() else ["-O3"]
    libs = library_paths()
    # at::parallel_for is a header template: under torch's OpenMP backend it splits work only where
    # compiled with OpenMP (and then shares torch's libgomp, already loaded under the same soname)
    openmp = ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else []
    return [*speed, *openmp, "-std=c++17", "-shared", "-fPIC", "-ffp-contract=fast", "-Wall", "-Wno-psabi",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *(f"-I{p}" for p in include_paths()), *(f"-L{p}" for p in libs),
            *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu", "-ltorch"]


def _build(target: Path) -> None:
    """Compile the library to `target` (through a temporary file beside it: never half-written)."""
    compiler = _compiler()
    if compiler is None:
        given = os.environ.get("CXX")
        raise OSError(f"no C++ compiler: {'$CXX=' + given if given else 'neither g++ nor c++'} found")
    print("bloom-runtime: building the native kernels for this machine (once; about a minute)",
          file=sys.stderr, flush=True)

    def compile_to(tmp: Path) -> None:
        done = subprocess.run([compiler, str(SOURCES / "decode.cpp"), "-o", str(tmp), *_flags()],
                              capture_output=True, text=True, timeout=900)
        if done.returncode:
            lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise OSError(f"{Path(compiler).name} failed: {(lines or ['?'])[0][:300]}")

    replace_atomically(target, compile_to)


@functools.cache
def available() -> str | None:
    """Builds (if needed) and loads the library: None once it is loaded, else why it is not there."""
    if os.environ.get(NATIVE_ENV, "on") == "off":
        return f"{NATIVE_ENV}=off"
    target = default_cache_dir() / "native" / f"bloom_native-{build_id()}.so"
    try:
        if not target.exists():
            _build(target)
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"bloom-runtime: no native kernels ({why}); torch's kernels serve", file=sys.stderr)
        return why
    return None


def unavailable(variant: str) -> str | None:
    """Why `variant` cannot run here (no library, a CPU without its instructions, a cap), or None."""
    why = available()
    if why is not None:
        return f"no native library: {why}"
    index = variant_index(variant)
    if index is None:
        return f"not built for {torch.backends.cpu.get_cpu_capability()}"
    if not torch.ops.bloom_native.supported(index):
        return f"this CPU lacks {variant}'s instructions"
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if cap in CAPS and variant not in CAPS[cap]:
        return f"ATEN_CPU_CAPABILITY={cap} caps it"
    return None


@functools.cache
def variant_index(variant: str) -> int | None:
    """The library's index of `variant` (what the ops take), None if there is no library or it has no
    such variant (one built for another architecture)."""
    if available() is not None:
        return None
    names = list(torch.ops.bloom_native.variants())
    return names.index(variant) if variant in names else None


@functools.cache
def widest_variant() -> int | None:
    """The index of the widest variant this CPU runs (its own report, under the caps), for the ops no
    probe chooses among (decode attention); None without the library."""
    if available() is not None:
        return None
    usable = [i for i, name in enumerate(torch.ops.bloom_native.variants()) if unavailable(name) is None]
    return usable[-1] if usable else None


class NativeKernel(Kernel):
    """A candidate running one variant of the native library (its `variant`); CPU only. Each binds the
    op's overload and the tensors it reads once (`bind`); `forward` goes through that."""

    variant: ClassVar[str]

    @classmethod
    def unsupported(cls, problem: Problem) -> str | None:
        return "CPU only" if problem.device != "cpu" else unavailable(cls.variant)

    def __init__(self, owner: Any) -> None:
        super().__init__(owner)
        why = unavailable(self.variant)
        if why is not None:
            raise RuntimeError(f"native-{self.variant}: {why}")
        self.index = variant_index(self.variant)

    def forward(self, owner: Any, *inputs: Any) -> torch.Tensor:
        return self.bind(owner)(*inputs)


LayerOperands = tuple[str, list[torch.Tensor | None], list[int]]


class NativeProduct(NativeKernel):
    """A native matrix product, one that `decode_layer` can hold too: the library's `op`, called on the
    rows, then `operands` (what it reads besides them, bound once), then the variant; an op taking int8
    activations (`scaled`) has the rows' scale after them and the output dtype before the variant."""

    op: ClassVar[str]
    scaled: ClassVar[bool] = False

    def operands(self, owner: Any) -> tuple:
        """What the op takes after the rows (and their scale), before the output dtype and the variant."""
        raise NotImplementedError

    def bind(self, owner: Any) -> Callable[..., torch.Tensor]:
        op, index = getattr(torch.ops.bloom_native, self.op).default, self.index
        operands = self.operands(owner)
        if self.scaled:
            return lambda q, x_scale, out_dtype: op(q.contiguous(), x_scale, *operands, out_dtype, index)
        return lambda x: op(x.contiguous(), *operands, index)

    def layer_operands(self, owner: Any) -> LayerOperands:
        """`operands` and the variant as `decode_layer` takes them: the tensors and the ints, each in the
        op's order (`slots`)."""
        operands = self.operands(owner)
        return slots(self.op, [o for o in operands if not isinstance(o, int)],
                     [*(o for o in operands if isinstance(o, int)), self.index])


def slots(op: str, tensors: list[torch.Tensor | None], ints: list[int]) -> LayerOperands:
    """`op`'s operands after the rows, in its order, as `decode_layer` takes them: four tensor slots and
    three int slots a product (unused ones None and 0)."""
    return op, [*tensors, *[None] * (4 - len(tensors))], [*ints, *[0] * (3 - len(ints))]


def variants_of(base: type[NativeKernel], *names: str, form: str = "") -> tuple[type[NativeKernel], ...]:
    """One candidate class per variant of `base`, named "native-<variant>" ("native-<form>-<variant>"
    for a second form of a role's native kernel)."""
    prefix = f"native-{form}-" if form else "native-"
    return tuple(type(f"{base.__name__}[{name}]", (base,), {"name": prefix + name, "variant": name})
                 for name in names)
