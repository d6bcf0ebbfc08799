"""Run a function on N ranks of a gloo process group, as torchrun would, and collect results.

Each rank gets the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so the code under test starts exactly as it does
under `torchrun`. Every rank's return value (or raised error) comes back.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def run_ranks(fn, world: int, *args) -> list[tuple[str, object]]:
    """[(status, value)] per rank: ("ok", return value) or ("error", (type, message, traceback))."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_entry, args=(world, free_port(), fn, args, results), nprocs=world, join=True)
        return [results[rank] for rank in range(world)]
