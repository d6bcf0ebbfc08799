"""Weights and KV caches on transparent huge pages (hugepages.py).

A decode step streams every weight, and on 4 KiB pages that stream ran 0.88x as fast (bfloat16
bloom-560m, AMD EPYC Zen 4): these tests guard that a loaded model's weights land on huge pages
(all of them, not only the 2 MiB-aligned middles of each storage), that a KV cache gets them as
it is written, and that moving memory onto them changes no value.

They need a Linux kernel with MADV_COLLAPSE (6.1+) and THP not switched off; elsewhere the
runtime does without, and these tests skip saying so.
"""

from __future__ import annotations

import sys
from pathlib import Path

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


def test_a_loaded_models_weights_sit_on_huge_pages(tmp_path):
    # 16 MiB of embedding, 6 and 8 MiB linears in bfloat16: none of them need start on a 2 MiB boundary
    model = hf_model(seed=3, vocab_size=8192, hidden_size=1024, n_layer=2, n_head=16)
    # unpacked: the same tensors whatever kernels the probe picks here (oneDNN's packs hide their memory)
    engine = br.load(save(model, tmp_path / "m"), dtype="bfloat16", pack=False)
    weights = [t for t in [*engine.model.parameters(), *engine.model.buffers()]
               if t.untyped_storage().nbytes() >= hugepages.HUGE_PAGE]
    total = sum(t.untyped_storage().nbytes() for t in weights)
    assert total >= 60 * 2**20
    on_huge = hugepages.bytes_on_huge_pages(weights)
    # each storage's pages rounded outward: all of it (whole pages, so at most 2 MiB a storage more)
    assert total <= on_huge <= total + 2 * hugepages.HUGE_PAGE * len(weights)


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
    assert hugepages.bytes_on_huge_pages([values]) >= values.nbytes
    assert torch.equal(values, before)


def test_storages_under_a_huge_page_are_left_alone():
    small = torch.ones(hugepages.HUGE_PAGE // 8)
    assert hugepages.collapse([small]) == 0
    assert hugepages.bytes_on_huge_pages([small]) == 0
