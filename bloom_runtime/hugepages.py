"""Weights and KV caches on transparent huge pages (Linux, CPU).

A decode step streams every weight once, so its floor is weight bytes / read bandwidth, and
with 4 KiB pages that stream also walks one page-table entry per 4 KiB. Backed by 2 MiB pages,
the same kernels read faster: on an AMD EPYC Zen 4 (2 threads, random bloom-560m bfloat16,
the two layouts timed alternately in one process) the tied head's 514 MB took 0.90x the time
and the block linears 0.955x; int8 and int4 weights, whose kernels do more work per byte,
gained 1-2%.

Most Linux systems leave huge pages to programs that ask (`transparent_hugepage=madvise`).
`collapse` asks for memory already written (loaded weights, repacked layouts:
MADV_COLLAPSE, Linux 6.1+, copies them onto huge pages now); `advise` asks for memory not yet
touched (a KV cache, filled column by column: MADV_HUGEPAGE). Both act on the 2 MiB pages that
hold a tensor's storage and change no byte of it. Where the system cannot (another
OS, an older kernel, THP off, no free huge pages) they do nothing and the model runs as before;
`bytes_on_huge_pages` says what they got.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
from collections.abc import Iterable

import torch

HUGE_PAGE = 2 << 20
# <linux/mman.h> advice values (Python's mmap module lacks MADV_COLLAPSE before 3.12).
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25


def _madvise() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


_MADVISE = _madvise()


def _span(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(start, length) of the huge pages that hold `tensor`'s storage, for a CPU storage of at least
    one huge page (smaller ones are not worth a page of their own); else None.

    Rounded outward: a storage that does not start on a 2 MiB boundary (most do not) would
    otherwise lose up to two pages' worth, a third of a 6 MiB weight. The pages at the ends also
    hold the neighbouring allocations' bytes, which stay as they are."""
    if tensor.device.type != "cpu" or tensor.layout != torch.strided:
        return None  # a layout that hides its memory (oneDNN's packed weights, sparse tensors)
    storage = tensor.untyped_storage()
    if storage.nbytes() < HUGE_PAGE:
        return None
    start = storage.data_ptr() // HUGE_PAGE * HUGE_PAGE
    end = -(-(storage.data_ptr() + storage.nbytes()) // HUGE_PAGE) * HUGE_PAGE
    return start, end - start


def _apply(tensors: Iterable[torch.Tensor], advice: int) -> int:
    """`advice` on each huge page that holds a distinct storage; the bytes it was accepted for.

    Page by page: an end page shared with a mapping that cannot take the advice (another kind of
    memory, a hole) is refused alone, where one call over the whole span would stop there."""
    if _MADVISE is None:
        return 0
    pages = set()
    for span in filter(None, map(_span, tensors)):
        pages.update(range(span[0], span[0] + span[1], HUGE_PAGE))
    return HUGE_PAGE * sum(_MADVISE(page, HUGE_PAGE, advice) == 0 for page in sorted(pages))


def collapse(tensors: Iterable[torch.Tensor]) -> int:
    """Move written CPU tensors (a loaded model's parameters and buffers) onto huge pages now,
    and keep them there (advised first, so khugepaged leaves them be and each is a mapping of
    its own in smaps). Returns the bytes moved; 0 where the system cannot."""
    tensors = list(tensors)
    advise(tensors)
    return _apply(tensors, MADV_COLLAPSE)


def advise(tensors: Iterable[torch.Tensor]) -> int:
    """Ask that untouched CPU tensors (fresh `torch.empty`) get huge pages as they are first written.
    Returns the bytes the advice was accepted for."""
    return _apply(tensors, MADV_HUGEPAGE)


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.empty`, but on CPU in fresh memory of its own starting on a huge-page boundary and
    advised (`advise`), so every page of it becomes a huge page as it is first written. Not from
    torch's allocator: that may hand back memory a freed tensor already touched (a load's
    temporaries), whose 4 KiB pages advice does not change, and a fresh allocation's end pages
    cross its mapping's edge, where no huge page fits (half of a 4 MiB KV buffer stayed on 4 KiB
    pages). Costs one huge page of address space, never touched."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < HUGE_PAGE or _MADVISE is None:
        return torch.empty(shape, dtype=dtype, device=device)
    # private: shared anonymous memory is shmem, whose huge pages are a setting of their own
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # which keeps the mapping alive
    skip = -raw.data_ptr() % HUGE_PAGE
    tensor = raw[skip:skip + nbytes].view(dtype).view(shape)
    advise([tensor])
    return tensor


def bytes_on_huge_pages(tensors: Iterable[torch.Tensor]) -> int:
    """How many bytes of the mappings holding `tensors` sit on huge pages now (/proc/self/smaps'
    AnonHugePages of each mapping that overlaps one of them, counted once; 0 off Linux)."""
    spans = [span for span in map(_span, tensors) if span is not None]
    if not spans or not sys.platform.startswith("linux"):
        return 0
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and ":" not in head:  # a mapping's first line: "lo-hi perms ..."
                lo, hi = (int(part, 16) for part in head.split("-"))
                inside = any(lo < start + length and hi > start for start, length in spans)
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1]) * 1024
    return total
