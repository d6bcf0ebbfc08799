"""Every published checkpoint layout loads to the same logits; every bad one is named."""

from __future__ import annotations

import json

import pytest
import torch
from hf_checkpoints import LAYOUTS, hf_model, save
from random_batches import left_padded_batch
from safetensors.torch import load_file, save_file

import bloom_runtime as br
from bloom_runtime import CheckpointError, ConfigError
from bloom_runtime.agreement import relative_error

FIELDS = dict(n_head=3, hidden_size=48, vocab_size=251, n_layer=2)


@pytest.fixture(scope="module")
def reference():
    return hf_model(seed=11, **FIELDS)


@pytest.fixture()
def good_dir(reference, tmp_path):
    return save(reference, tmp_path / "ckpt")


@pytest.mark.parametrize("prefix", [True, False], ids=["transformer-prefix", "no-prefix"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_to_reference_logits(reference, tmp_path, layout, prefix):
    directory = save(reference, tmp_path / layout, layout=layout, prefix=prefix)
    ids, mask = left_padded_batch(FIELDS["vocab_size"], [9, 5])
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask).logits
    assert relative_error(br.load(directory).logits(ids, mask), ref, mask) <= 1e-5


def test_transformers_reads_our_test_layouts(reference, tmp_path):
    """The .bin layouts are written by hand; make sure they are what transformers expects."""
    directory = save(reference, tmp_path / "bin", layout="bin-sharded")
    reloaded = type(reference).from_pretrained(directory)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def _rewrite_safetensors(directory, edit):
    path = directory / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)
    return path


QKV = "transformer.h.1.self_attention.query_key_value.weight"


@pytest.mark.parametrize(
    "breakage, error, words",
    [
        (lambda d: (d / "config.json").unlink(), CheckpointError, ["config.json"]),
        (lambda d: (d / "model.safetensors").unlink(), CheckpointError, ["no weights found"]),
        (lambda d: (d / "config.json").write_text("{not json"), ConfigError, ["config.json", "JSON"]),
        (lambda d: _drop_config_key(d, "n_layer"), ConfigError, ["config.json", "n_layer"]),
        (lambda d: _set_config_key(d, "n_head", 5), ConfigError, ["divisible", "n_head"]),
        (lambda d: _truncate(d / "model.safetensors"), CheckpointError, ["model.safetensors", "truncated"]),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), CheckpointError,
         ["model.safetensors"]),
        (lambda d: _rewrite_safetensors(d, lambda s: s.pop(QKV)), CheckpointError,
         [QKV.removeprefix("transformer.")]),
        (lambda d: _rewrite_safetensors(d, lambda s: s.update({QKV: s[QKV][:-3]})), CheckpointError,
         ["model.safetensors", "query_key_value", "(141, 48)", "(144, 48)"]),
        (lambda d: _rewrite_safetensors(d, lambda s: s[QKV].__setitem__((0, 0), float("nan"))),
         CheckpointError, ["model.safetensors", "query_key_value", "NaN"]),
        (lambda d: _rewrite_safetensors(d, lambda s: s[QKV].__setitem__((1, 1), float("inf"))),
         CheckpointError, ["query_key_value", "inf"]),
    ],
    ids=["no-config", "no-weights", "config-not-json", "config-missing-key", "config-bad-heads",
         "truncated", "garbage-file", "missing-tensor", "wrong-shape", "nan", "inf"],
)  # fmt: skip
def test_bad_checkpoint_raises_error_naming_what_is_wrong(good_dir, breakage, error, words):
    breakage(good_dir)
    with pytest.raises(error) as caught:
        br.load(good_dir)
    for word in words:
        assert word in str(caught.value), f"{word!r} not in {caught.value}"


@pytest.mark.parametrize("layout", ["bin", "bin-sharded", "safetensors-sharded"])
def test_truncated_or_missing_shards_are_named(reference, tmp_path, layout):
    directory = save(reference, tmp_path / layout, layout=layout)
    victim = sorted(p for p in directory.iterdir() if p.suffix in (".bin", ".safetensors"))[-1]
    _truncate(victim)
    with pytest.raises(CheckpointError, match=victim.name):
        br.load(directory)
    if layout.endswith("sharded"):
        victim.unlink()
        with pytest.raises(CheckpointError, match=f"{victim.name}.*missing"):
            br.load(directory)


def test_not_a_directory_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        br.load(tmp_path / "nowhere")


def test_pickle_with_code_is_refused(reference, tmp_path):
    """weights_only=True: a .bin that would run code on unpickling is rejected, not run."""
    directory = save(reference, tmp_path / "evil", layout="bin")
    torch.save({"payload": _Evil()}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        br.load(directory)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_config(directory, edit):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _drop_config_key(directory, key):
    _edit_config(directory, lambda c: c.pop(key))


def _set_config_key(directory, key, value):
    _edit_config(directory, lambda c: c.__setitem__(key, value))
