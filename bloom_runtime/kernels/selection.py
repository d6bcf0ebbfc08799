"""Which kernel serves a role on this machine: probed for correctness, timed, cached.

A role (`Role`: 16-bit linear, W8A16, W8A8, W4A16) has candidate kernels. Before a
candidate serves a problem (a role at one weight shape and dtype), it is run here,
on the machine the model runs on, against exact reference math in float64 on
inputs chosen to break it (full-range int8, the extremes that saturate 16-bit pair
sums). One that raises, or whose relative error passes its stated tolerance, never
serves. The correct ones are timed at a decode-sized, a small-batch and a
prefill-sized row count, and the fastest serves the row counts nearest each.
Nothing here knows which CPU is fast at what: every figure comes from the probe.

Candidates are timed in turns, one run each, and keep their fastest run, so a burst
of load elsewhere slows all of them alike. A decision timed while other processes
used a quarter of the CPUs or more serves this process but is not cached: the next
load probes again.

Decisions are kept per machine (CPU model and flags, the ISA caps oneDNN and aten
obey, threads, torch version, this runtime's version and its native library's build)
in `$BLOOM_RUNTIME_CACHE_DIR` (default `~/.cache/bloom-runtime`), so a second load
probes nothing.

    BLOOM_RUNTIME_KERNELS="w8a8=int_mm,dense16=plain"   force a kernel per role (tests, A/B runs),
                                                         wherever it may hold the weights it needs
    BLOOM_RUNTIME_KERNEL_CACHE=off                       probe every time, keep nothing
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InputError

FORCE_ENV = "BLOOM_RUNTIME_KERNELS"
CACHE_ENV = "BLOOM_RUNTIME_KERNEL_CACHE"
CACHE_DIR_ENV = "BLOOM_RUNTIME_CACHE_DIR"
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")  # what dispatch may use: part of the machine

TIMED_ROWS = (1, 8, 128)  # decode, a batch of decodes (serve's default batch), prefill; a call takes
# the nearest (log scale): 2 rows go with 1, 3 to 31 with 8, 32 and more with 128
PROBED_ROWS = (1, 17)  # correctness: one row, and an odd count past any vector width
PROBED_OUTPUTS = 48  # outputs checked against float64 (errors depend on the input width, kept real)
TIMED_OUTPUTS = 2048  # timing shape's cap on outputs: time grows with them, the choice does not
TAIL = 16  # a cut output count keeps the real one's remainder modulo this (widest vector, cuBLASLt's 8)
TIME_BUDGET_S = 0.25  # per candidate and row count: at least one round, at most ROUNDS
ROUNDS = 5
CONTENDED_SHARE = 0.25  # of all CPUs, used by other processes while timing: the times are not kept
RING_BYTES, RING_MAX = 32 * 2**20, 8  # distinct weights a timing cycles through (elements; at most)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A role at one shape: `outputs` x `inputs` weights (`group`: int4 group size), activations
    of `dtype` on `device` (a device type). `copies`: a kernel may hold a second layout of the
    weight beside the module's own, or take it over without giving rows back (False for a float
    tied head: its lookups read rows, from the weight or from a kernel that can look them up)."""

    role: str
    device: str
    dtype: str
    outputs: int
    inputs: int
    group: int = 0
    copies: bool = True

    @classmethod
    def of(cls, role: str, outputs: int, inputs: int, device: torch.device, dtype: torch.dtype,
           **given) -> Problem:
        """The problem of an `outputs` x `inputs` weight on `device` with activations of `dtype`."""
        return cls(role, device.type, str(dtype).removeprefix("torch."), outputs, inputs, **given)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def key(self) -> str:
        group = f" g{self.group}" if self.group else ""
        return f"{self.role} {self.device} {self.dtype} {self.outputs}x{self.inputs}{group}" + \
            ("" if self.copies else " no-copy")


class Kernel(nn.Module):
    """One way to run a role, built from the tensors of the module it serves (`owner`).

    Tensors it derives (a packed layout) are non-persistent buffers: `.to()` moves them,
    `state_dict` leaves them out. `drops` names the owner's tensors it replaces, so a
    linear can hold its weight once; `restore` gives them back plain.
    """

    name: ClassVar[str]
    drops: ClassVar[tuple[str, ...]] = ()
    copies: ClassVar[bool] = False  # holds a second layout of the weight while the owner keeps its own
    lookups: ClassVar[bool] = False  # gives back rows of the weight it takes over (`rows(ids)`)

    @classmethod
    def unsupported(cls, problem: Problem) -> str | None:
        """Why this kernel cannot run `problem` at all (a device it lacks; a shape known to crash
        the process, which no probe could survive), or None."""
        return None

    @classmethod
    def tolerance(cls, problem: Problem) -> float:
        """The relative error (Frobenius, against float64) this kernel is allowed."""
        return 4 * torch.finfo(problem.torch_dtype).eps

    def __init__(self, owner: Any) -> None:
        """Build what this kernel derives from `owner`'s tensors (nothing, by default)."""
        super().__init__()

    def bind(self, owner: Any) -> Callable[..., torch.Tensor]:
        """This kernel's call on `owner`'s tensors, taking the inputs alone: what serves, and what the
        probe checks and times. A decode step makes about a hundred such calls, so a kernel may bind
        what it reads once here (native ones do: an nn.Module attribute costs ~0.5 us a read) rather
        than in `forward`; by default, `forward` with `owner`."""
        return functools.partial(self.forward, owner)

    def restore(self, name: str) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} drops no tensor {name}")

    def layer_operands(self, owner: Any) -> tuple[str, list, list[int]] | None:
        """This kernel as one product of the native fused decode layer (`decode_layer`): its op's name and
        the op's operands after the rows (native.slots); None where it is not a native op."""
        return None


class Role:
    """A matmul role: its candidates, and how to make a probe's inputs and exact answer."""

    name: ClassVar[str]
    candidates: ClassVar[tuple[type[Kernel], ...]]

    @classmethod
    def sample(cls, problem: Problem, rows: int, generator: torch.Generator) -> tuple[Any, list[tuple]]:
        """An owner holding random weights of `problem`'s shape, and the kernel's inputs for `rows`:
        one tuple of arguments per form the role's callers use (W8A8: per-row, per-tensor scales)."""
        raise NotImplementedError

    @classmethod
    def reference(cls, owner: Any, inputs: tuple) -> torch.Tensor:
        """The exact product in float64."""
        raise NotImplementedError

    @classmethod
    def rounding(cls, inputs: tuple) -> float:
        """Relative error the contract itself allows for these inputs (an output dtype's rounding)."""
        return 0.0


@dataclasses.dataclass
class Trial:
    """One candidate on one problem: correct or why not, and its times (ms) by row count."""

    name: str
    correct: bool
    why: str = ""
    error: float | None = None
    ms: dict[int, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Decision:
    """Which candidate serves each timed row count of a problem, and the trials behind it."""

    problem: Problem
    serves: dict[int, str]
    trials: list[Trial]
    source: str = "probed"  # probed | cache | forced
    contended: bool = False  # timed while other processes used the CPUs: serves, is not cached

    def name_for(self, rows: int) -> str:
        """The kernel for a call with `rows` rows: that of the nearest timed row count (log scale)."""
        nearest = min(self.serves, key=lambda timed: abs(math.log(rows) - math.log(timed)))
        return self.serves[nearest]

    def to_json(self) -> dict:
        return {"serves": {str(k): v for k, v in self.serves.items()},
                "trials": [dataclasses.asdict(t) for t in self.trials]}

    @classmethod
    def from_json(cls, problem: Problem, raw: dict) -> Decision:
        trials = [Trial(**{**t, "ms": {int(k): v for k, v in t["ms"].items()}}) for t in raw["trials"]]
        return cls(problem, {int(k): v for k, v in raw["serves"].items()}, trials, "cache")


ROLES: dict[str, type[Role]] = {}


def register(role: type[Role]) -> type[Role]:
    ROLES[role.name] = role
    return role


class Selector:
    """Decides problems, remembering them in memory and in the machine's cache file."""

    def __init__(self, cache_dir: Path | None = None, use_cache: bool | None = None) -> None:
        self.cache_file = (cache_dir or default_cache_dir()) / f"kernels-{machine_fingerprint()}.json"
        self.use_cache = os.environ.get(CACHE_ENV, "on") != "off" if use_cache is None else use_cache
        self.decided: dict[str, Decision] = {}

    def decide(self, problem: Problem) -> Decision:
        forced = forced_kernels().get(problem.role)
        if forced is not None and _may_serve(candidate(problem.role, forced), problem):
            return _forced(problem, forced)
        key = problem.key()
        if key not in self.decided:
            decision = self._cached(problem) or probe(problem)
            if decision.source == "probed" and self.use_cache and not decision.contended:
                self._store(key, decision)
            self.decided[key] = decision
        return self.decided[key]

    def _read(self) -> dict:
        try:
            return json.loads(self.cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _cached(self, problem: Problem) -> Decision | None:
        if not self.use_cache:
            return None
        raw = self._read().get(problem.key())
        try:
            decision = None if raw is None else Decision.from_json(problem, raw)
        except (KeyError, TypeError, ValueError):
            return None  # a file from another version: probe again
        names = [c.name for c in ROLES[problem.role].candidates]
        if decision is None or [t.name for t in decision.trials] != names:
            return None  # decided among other candidates: probe again
        if any(candidate(problem.role, name).unsupported(problem) for name in set(decision.serves.values())):
            return None  # a kernel it chose cannot run now (its native library failed to build): probe again
        return decision

    def _store(self, key: str, decision: Decision) -> None:
        from ..files import write_json

        try:
            write_json(self.cache_file, {**self._read(), key: decision.to_json()})
        except OSError:
            pass  # a read-only home: the decision still serves this process


_SELECTOR: Selector | None = None


def selector() -> Selector:
    """The process's selector (a fresh one if the cache settings changed since)."""
    global _SELECTOR
    fresh = Selector()
    settings = (fresh.cache_file, fresh.use_cache)
    if _SELECTOR is None or (_SELECTOR.cache_file, _SELECTOR.use_cache) != settings:
        _SELECTOR = fresh
    return _SELECTOR


def default_cache_dir() -> Path:
    given = os.environ.get(CACHE_DIR_ENV)
    if given:
        return Path(given)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bloom-runtime"


def machine_fingerprint() -> str:
    """What a decision depends on: the CPU, the dispatch caps, threads, torch, this runtime's version,
    its native library's build and the kernel registry's own code (an edited kernel, or a change in
    which may serve where, is probed again) and the row counts timed."""
    from .. import __version__
    from .native import NATIVE_ENV, build_id

    parts = [platform.machine(), _cpu_model_and_flags(), torch.__version__, str(torch.get_num_threads()),
             *(f"{name}={os.environ.get(name, '')}" for name in (*ISA_CAPS, NATIVE_ENV)), __version__,
             build_id(), _registry_code(), f"timed rows {TIMED_ROWS}"]
    if torch.cuda.is_available():
        parts += [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def _registry_code(package: Path = Path(__file__).parent) -> str:
    """A digest of the Python side of the kernels (this package's modules)."""
    sources = sorted(package.glob("*.py"))
    return hashlib.sha1(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]


@functools.cache
def _cpu_model_and_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")  # x86, and Arm's names
    lines = {line.split(":", 1)[0].strip(): line for line in text.splitlines() if ":" in line}
    return "\n".join(lines[name] for name in wanted if name in lines)


def forced_kernels() -> dict[str, str]:
    """role -> kernel name from BLOOM_RUNTIME_KERNELS ("w8a8=int_mm,dense16=plain")."""
    text = os.environ.get(FORCE_ENV, "").strip()
    forced = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        role, _, name = item.partition("=")
        if role not in ROLES or name not in {c.name for c in ROLES[role].candidates}:
            choices = "; ".join(f"{r}: {', '.join(c.name for c in ROLES[r].candidates)}" for r in ROLES)
            raise InputError(f"{FORCE_ENV}: {item!r} is not role=kernel ({choices})")
        forced[role] = name
    return forced


def _forced(problem: Problem, name: str) -> Decision:
    cls = candidate(problem.role, name)
    why = cls.unsupported(problem)
    if why:
        raise InputError(f"{FORCE_ENV} asks for {name} on {problem.key()}, which it cannot run: {why}")
    return Decision(problem, dict.fromkeys(TIMED_ROWS, name), [Trial(name, True, "forced")], "forced")


def candidate(role: str, name: str) -> type[Kernel]:
    return next(c for c in ROLES[role].candidates if c.name == name)


def probe(problem: Problem) -> Decision:
    """Check every candidate of the problem's role on this machine, time the correct ones, pick."""
    role = ROLES[problem.role]
    trials = [_check(role, cls, problem) for cls in role.candidates]
    correct = [t for t in trials if t.correct]
    if not correct:
        lines = "; ".join(f"{t.name}: {t.why}" for t in trials)
        raise RuntimeError(f"no kernel computes {problem.key()} correctly on this machine ({lines})")
    contended = False
    if len(correct) > 1:
        before, start = _cpu_seconds(), time.perf_counter()
        classes = [candidate(problem.role, trial.name) for trial in correct]
        for trial, ms in zip(correct, _times(role, classes, problem)):
            trial.ms = ms
        contended = _contended(before, time.perf_counter() - start)
    return Decision(problem, _winners(problem.role, correct), trials, contended=contended)


def _winners(role: str, correct: list[Trial]) -> dict[int, str]:
    """Which kernel serves each timed row count: the fastest at each, unless that would hold a
    weight twice (a kernel that takes the weight over beside one that needs it plain). Then the
    least slow of the ways that hold it once: each kernel that takes it over, throughout, or the
    fastest at each row count among those that keep it plain; slowness is the product over row
    counts of the time relative to the fastest there."""
    fastest = {rows: min(t.ms.get(rows, math.inf) for t in correct) for rows in TIMED_ROWS}

    def best_of(trials: list[Trial]) -> dict[int, str]:
        return {rows: min(trials, key=lambda t: t.ms.get(rows, math.inf)).name for rows in TIMED_ROWS}

    def slowness(serves: dict[int, str]) -> float:
        ms = {t.name: t.ms for t in correct}
        return sum(math.log(ms[name][rows] / fastest[rows]) for rows, name in serves.items())

    if len(correct) == 1:
        return dict.fromkeys(TIMED_ROWS, correct[0].name)
    serves = best_of(correct)
    names = set(serves.values())
    if len(names) == 1 or not any(candidate(role, n).drops for n in names):
        return serves
    plain = [t for t in correct if not candidate(role, t.name).drops]
    options = [dict.fromkeys(TIMED_ROWS, t.name) for t in correct if candidate(role, t.name).drops]
    return min(options + ([best_of(plain)] if plain else []), key=slowness)


def _may_serve(cls: type[Kernel], problem: Problem) -> bool:
    """False where the kernel would hold a second layout of a weight the module may not double, or
    take it over without giving back the rows lookups read (a float tied head); forcing a role's
    kernel passes such modules by."""
    return problem.copies or not (cls.copies or cls.drops and not cls.lookups)


def _check(role: type[Role], cls: type[Kernel], problem: Problem) -> Trial:
    why = cls.unsupported(problem)
    if why is None and not _may_serve(cls, problem):
        why = "would hold a second copy of a weight the module must keep, or take it without its rows"
    if why:
        return Trial(cls.name, False, why)
    generator = torch.Generator().manual_seed(0)
    small = _cut(problem, PROBED_OUTPUTS)
    worst, limit = 0.0, cls.tolerance(problem)
    try:
        for rows in PROBED_ROWS:
            owner, inputs = role.sample(small, rows, generator)
            call = cls(owner).bind(owner)
            for variant in inputs:
                got = call(*variant).double().cpu()
                want = role.reference(owner, variant).cpu()
                error = float((got - want).norm() / want.norm().clamp(min=1e-30))
                allowed = max(limit, role.rounding(variant))
                if not error <= allowed:  # NaN too
                    why = f"relative error {error:.3g} > {allowed:.3g} at {rows} rows"
                    return Trial(cls.name, False, why, error)
                worst = max(worst, error)
    except Exception as err:  # a kernel this machine cannot run: never used here
        return Trial(cls.name, False, f"raised {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    return Trial(cls.name, True, "", worst)


def _cut(problem: Problem, outputs: int) -> Problem:
    """The problem with at most about `outputs` outputs, its tail kept: a kernel that mishandles the
    real width's remainder, or refuses it (CUDA's int8 GEMM wants multiples of 8), fails its check
    here rather than when it serves (or when it is timed)."""
    if problem.outputs <= outputs:
        return problem
    return dataclasses.replace(problem, outputs=outputs + problem.outputs % TAIL)


def activations(problem: Problem, rows: int, generator: torch.Generator) -> torch.Tensor:
    """Random float activations [rows, inputs] of the problem's dtype, on its device."""
    x = torch.randn(rows, problem.inputs, generator=generator)
    return x.to(problem.device, problem.torch_dtype)


def _times(role: type[Role], classes: list[type[Kernel]], problem: Problem) -> list[dict[int, float]]:
    """ms per call of each candidate at each timed row count. Each candidate cycles through distinct
    weights of its own (RING_BYTES of them at least, up to RING_MAX) so that, as in a decode step,
    they are not in the nearest cache: candidates that read the same plain weights, timed one after
    another, found them in the last level (on an EPYC Zen 4, 1024 x 1024 rows read at 87 GB/s while a
    kernel with its own layout read from memory at 28). The candidates take turns, one run each, and
    each keeps its fastest run, so a burst of load elsewhere slows a round of all of them rather than
    one candidate's every run."""
    generator = torch.Generator().manual_seed(1)
    timed = _cut(problem, TIMED_OUTPUTS)
    copies = min(RING_MAX, max(1, math.ceil(RING_BYTES / (timed.outputs * timed.inputs))))
    out: list[dict[int, float]] = [{} for _ in classes]
    for rows in TIMED_ROWS:
        runs = []
        for cls in classes:
            samples = [role.sample(timed, rows, generator) for _ in range(copies)]
            runs.append(_cycle([(cls(owner).bind(owner), inputs[0]) for owner, inputs in samples]))
        for times, best in zip(out, _interleaved_best_ms(runs, problem.device)):
            times[rows] = best / copies
    return out


def _cycle(calls: list[tuple[Callable[..., torch.Tensor], tuple]]) -> Callable[[], None]:
    def run() -> None:
        for call, args in calls:
            call(*args)
    return run


def _interleaved_best_ms(runs: list[Callable[[], object]], device: str) -> list[float]:
    """The fastest of up to ROUNDS turns of each of `runs`, taken in turn (at least one round, and
    rounds while TIME_BUDGET_S a run remains)."""
    from ..device import synchronize

    where = torch.device(device)
    for fn in runs:
        fn(), synchronize(where)  # warm: first-call setup is not the kernel's speed
    best, spent = [float("inf")] * len(runs), 0.0
    for round_ in range(ROUNDS):
        if round_ and spent >= TIME_BUDGET_S * len(runs):
            break
        for i, fn in enumerate(runs):
            start = time.perf_counter()
            fn()
            synchronize(where)
            elapsed = time.perf_counter() - start
            best[i], spent = min(best[i], elapsed), spent + elapsed
    return [b * 1e3 for b in best]


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy seconds of every CPU of the machine, CPU seconds of this process) so far; None where
    /proc/stat cannot be read. Busy counts steal: a hypervisor's other guests contend too."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait
    own = os.times()
    return busy, own.user + own.system


def _contended(before: tuple[float, float] | None, wall_s: float) -> bool:
    """Whether other processes took more than CONTENDED_SHARE of the machine's CPUs while timing."""
    after = _cpu_seconds()
    if before is None or after is None or wall_s <= 0:
        return False
    others = (after[0] - before[0]) - (after[1] - before[1])
    return others > CONTENDED_SHARE * wall_s * (os.cpu_count() or 1)
