"""Loading casts tensor by tensor: no second full copy of the weights in RAM.

A float32 checkpoint of S bytes loaded as bfloat16 must raise the process's
anonymous memory by S/2 (the model) and little more: reading the whole file
first and casting after (as `torch.load` + `.to()` does) costs 1.5 S. A kernel
that lays a weight out at load (the outer products' blocks) holds that one weight
twice until the plain one is dropped, one weight at a time: the largest (the tied
head) is allowed once more. Measured in a fresh subprocess that samples RssAnon
from /proc while loading.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hf_checkpoints import hf_model, save

PROBE = r"""
import sys, threading, time
import torch
import bloom_runtime as br

# Start torch's thread pools first, and let the kernel probe decide this model's shapes (it
# reads no weights): that one-off memory is not the loader's.
warm = torch.randn(512, 512)
torch.isfinite(warm).all(); warm.to(torch.bfloat16).sum()
from bloom_runtime.loader import kernel_decisions
kernel_decisions(sys.argv[1], "bfloat16")

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

peak, stop = [anon_kib()], threading.Event()
def sample():
    while not stop.is_set():
        peak.append(anon_kib()); time.sleep(0.002)
base = anon_kib()
t = threading.Thread(target=sample, daemon=True)  # a daemon: a failed load cannot hang the exit
t.start()
try:
    engine = br.load(sys.argv[1], dtype="bfloat16")
finally:
    stop.set(); t.join()
print((max(peak) - base) * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_loading_float32_as_bfloat16_keeps_no_full_copy(tmp_path, layout):
    model = hf_model(seed=41, vocab_size=32000, hidden_size=512, n_layer=8, n_head=8)
    directory = save(model, tmp_path / layout, layout=layout)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())  # tied head counted once
    largest_bf16 = max(p.numel() * 2 for p in model.parameters())  # one weight's layout at a time
    del model
    out = subprocess.run([sys.executable, "-c", PROBE, str(directory)], capture_output=True, text=True,
                         check=True, timeout=300)
    grown = int(out.stdout.split()[-1])
    budget = fp32_bytes / 2 + largest_bf16 + 16 * 2**20  # the model in bfloat16, one layout, slack
    assert grown <= budget, json.dumps({"grown_MiB": grown / 2**20, "budget_MiB": budget / 2**20})
