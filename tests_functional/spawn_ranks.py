"""Run a function on N ranks of a gloo process group, as torchrun would, and collect results.

Each rank gets the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so the code under test starts exactly as it does
under `torchrun`. Every rank's return value (or raised error) comes back.
The port is free when chosen but may be taken before rank 0 binds it: a run
that fails for that reason is started again on a new port.
"""

from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp

from bloom_runtime.bench.servers import free_port


def _entry(rank: int, world: int, port: int, fn, args, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      BLOOM_RUNTIME_DIST_TIMEOUT="60")  # fmt: skip
    try:
        results[rank] = ("ok", fn(*args))
    except Exception as err:  # the test inspects each rank's error
        results[rank] = ("error", (type(err).__name__, str(err), traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, attempts: int = 3) -> list[tuple[str, object]]:
    """[(status, value)] per rank: ("ok", return value) or ("error", (type, message, traceback))."""
    for _ in range(attempts - 1):
        outcome = _spawn(fn, world, args)
        if not any(status == "error" and _port_taken(value) for status, value in outcome):
            return outcome
    return _spawn(fn, world, args)


def _spawn(fn, world: int, args: tuple) -> list[tuple[str, object]]:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_entry, args=(world, free_port(), fn, args, results), nprocs=world, join=True)
        return [results[rank] for rank in range(world)]


def on_every_rank(outcome: list[tuple[str, object]]) -> list[object]:
    """Each rank's return value, after checking that no rank failed (naming every one that did)."""
    failed = [f"rank {rank}: {value[0]}: {value[1]}" for rank, (status, value) in enumerate(outcome)
              if status != "ok"]
    assert not failed, "; ".join(failed)
    return [value for _, value in outcome]


def _port_taken(error: tuple) -> bool:
    return "address already in use" in error[1].lower() or "EADDRINUSE" in error[1]
