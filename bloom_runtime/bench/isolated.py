"""Each peer engine runs in a process of its own.

A peer that crashes (llama.cpp built for instructions this CPU lacks dies of SIGILL)
is then a failed peer in the report, never a dead `perf` run or pytest, and our
engine is never timed in a process where another engine ran (once CTranslate2 had
run in a process, our decode steps in it were up to 1.4x slower).

The parent sends the peer's settings and the cases as JSON on stdin; the child
answers one JSON line per case as it is measured, so the parent shows progress and
keeps every case measured before a crash.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

TIMEOUT_S = 3600  # one peer's whole grid; a hung peer is killed and reported
CHILD = [sys.executable, "-m", "bloom_runtime.bench.isolated"]


@dataclasses.dataclass
class PeerResult:
    rows: list[dict]
    describe: str
    error: str | None  # None: every case ran


def run_peer(spec: dict, on_case: Callable[[dict | None], None], timeout: float = TIMEOUT_S) -> PeerResult:
    """Measure `spec["name"]` over `spec["cases"]` in a child process; `on_case` gets each row as it
    comes (None for a case the peer does not run)."""
    rows, describe = [], spec["name"]
    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(CHILD, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                 text=True)
        child.stdin.write(json.dumps(spec))
        child.stdin.close()
        try:
            for line in child.stdout:
                message = json.loads(line)
                describe = message.get("describe", describe)
                if "row" in message:
                    rows.append(message["row"])
                    on_case(message["row"])
                elif "skipped" in message:
                    on_case(None)
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            return PeerResult(rows, describe, f"killed after {timeout:.0f} s")
        stderr.seek(0)
        last = [line for line in stderr.read().splitlines() if line.strip()][-1:]
    return PeerResult(rows, describe, None if code == 0 else _exit_reason(code, last))


def _exit_reason(code: int, last_lines: list[str]) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (an instruction this CPU lacks: rebuild it here)" if name == "SIGILL" else ""
        return f"crashed with {name}{hint}"
    return f"exited with status {code}" + (f": {last_lines[0][:300]}" if last_lines else "")


def _child() -> None:
    import torch

    from ..errors import BloomRuntimeError
    from .cases import Case
    from .harness import measure, prompt_ids
    from .peers import make_peer
    from .roofline import BandwidthBeside

    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec["threads"])

    def say(message: dict) -> None:
        print(json.dumps(message), flush=True)

    try:
        runner = make_peer(spec["name"], Path(spec["directory"]), spec["dtype"], spec["quant"],
                           spec["device"], Path(spec["cache"]), spec["threads"], spec["longest"])
    except BloomRuntimeError as err:
        print(f"{spec['name']}: {err}", file=sys.stderr)
        sys.exit(2)
    say({"describe": getattr(runner, "describe", runner.name)})
    device = torch.device(spec["device"])
    beside = BandwidthBeside(device)
    for raw in spec["cases"]:
        case = Case(**raw)
        if case.batch > getattr(runner, "max_batch", case.batch):  # said in the description
            say({"skipped": case.key})
            continue
        ids = prompt_ids(case, spec["vocab_size"], spec["seed"])
        say({"row": beside.stamp(measure(runner, case, ids, spec["warmup"], spec["repeat"], device))})


if __name__ == "__main__":
    _child()
