"""Weights and KV caches on transparent huge pages (hugepages.py).

A decode step streams every weight, and on 4 KiB pages that stream ran 0.88x as fast (bfloat16
bloom-560m, AMD EPYC Zen 4): these tests guard that a loaded model's weights land on huge pages
(every whole page inside each storage, and its end pages too where the neighbouring memory can
take them, not only the 2 MiB-aligned middles), that a KV cache gets them as it is written, and
that moving memory onto them changes no value.

They need a Linux kernel with MADV_COLLAPSE (6.1+) and THP not switched off; elsewhere the
runtime does without, and these tests skip saying so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_checkpoints import hf_model, save

import bloom_runtime as br
from bloom_runtime import hugepages
from bloom_runtime.kv_cache import KVCache

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _collapse_works() -> bool:
    probe = torch.ones(3 * hugepages.HUGE_PAGE // 4)
    return hugepages.collapse([probe]) > 0 and hugepages.bytes_on_huge_pages([probe]) > 0


def _thp_mode() -> str:
    text = THP_MODE.read_text() if THP_MODE.exists() else ""
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "unknown"


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not _collapse_works(),
                                reason=f"this system moves no memory onto huge pages (THP {_thp_mode()}, "
                                       "or a kernel without MADV_COLLAPSE)")


def _whole_pages_inside(tensor: torch.Tensor) -> int:
    """Bytes of the huge pages that lie wholly inside `tensor`'s storage: what it gets wherever it sits.
    Its end pages also hold neighbouring memory, which may or may not be able to take them."""
    begin = tensor.untyped_storage().data_ptr()
    end = begin + tensor.untyped_storage().nbytes()
    page = hugepages.HUGE_PAGE
    return max(0, end // page * page - -(-begin // page) * page)


def test_a_loaded_models_weights_sit_on_huge_pages(tmp_path):
    # 16 MiB of embedding, 6 and 8 MiB linears in bfloat16: none of them need start on a 2 MiB boundary
    model = hf_model(seed=3, vocab_size=8192, hidden_size=1024, n_layer=2, n_head=16)
    # unpacked: the same tensors whatever kernels the probe picks here (oneDNN's packs hide their memory)
    engine = br.load(save(model, tmp_path / "m"), dtype="bfloat16", pack=False)
    weights = [t for t in [*engine.model.parameters(), *engine.model.buffers()]
               if t.untyped_storage().nbytes() >= hugepages.HUGE_PAGE]
    inside = sum(map(_whole_pages_inside, weights))
    assert inside >= 40 * 2**20
    assert hugepages.bytes_on_huge_pages(weights) >= inside


def test_a_storages_end_pages_are_collapsed_where_their_neighbours_allow():
    # a 6 MiB storage starting 492 bytes past a page boundary, with memory of the same mapping on both
    # sides: rounded inward, only its 2 whole pages would move; rounded outward, all 4 pages it touches
    page = hugepages.HUGE_PAGE
    buffer = np.zeros(6 * page, dtype=np.uint8)
    skip = -buffer.ctypes.data % page + page + 492
    values = torch.from_numpy(buffer[skip:skip + 3 * page]).view(torch.float32).view(-1)
    values.normal_()
    before = values.clone()
    assert hugepages.collapse([values]) == 4 * page
    assert hugepages.bytes_on_huge_pages([values]) >= values.nbytes
    assert torch.equal(values, before)


def test_a_kv_cache_gets_huge_pages_as_it_is_written():
    shape = dict(n_layer=2, batch=1, n_head=16, max_len=1024, head_dim=64)  # 4 MiB a buffer
    cache = KVCache(**shape, dtype=torch.bfloat16, device=torch.device("cpu"))
    cache.keys.fill_(1.0)
    # all of it: a buffer that does not start on a huge page keeps its end pages on 4 KiB ones
    assert hugepages.bytes_on_huge_pages([cache.keys]) >= cache.keys.nbytes


def test_moving_memory_onto_huge_pages_changes_no_value():
    torch.manual_seed(0)
    values = torch.randn(5 * hugepages.HUGE_PAGE // 4 + 123)  # 5 MiB and a tail, wherever malloc put it
    before = values.clone()
    assert hugepages.collapse([values]) > 0
    assert hugepages.bytes_on_huge_pages([values]) >= _whole_pages_inside(values)
    assert torch.equal(values, before)


def test_storages_under_a_huge_page_are_left_alone():
    small = torch.ones(hugepages.HUGE_PAGE // 8)
    assert hugepages.collapse([small]) == 0
    assert hugepages.bytes_on_huge_pages([small]) == 0
