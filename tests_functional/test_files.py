"""Outputs are staged and renamed into place, and readable as the umask says (not owner-only)."""

from __future__ import annotations

import os
import stat

import pytest

from bloom_runtime import InputError
from bloom_runtime.files import replace_atomically, staged_output
from bloom_runtime.weights import cut_checkpoint


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_checkpoint_tools_respect_the_umask(tmp_path, umask_022):
    out = cut_checkpoint("tiny", tmp_path / "cut", tp=2)  # mkdtemp alone would give 0700 / 0600
    assert mode(out) == 0o755 and mode(out / "rank_1") == 0o755
    assert mode(out / "rank_0" / "model.safetensors") == 0o644 and mode(out / "manifest.json") == 0o644


def test_result_files_respect_the_umask(tmp_path, umask_022):
    replace_atomically(tmp_path / "r.json", lambda tmp: tmp.write_text("{}"))
    assert mode(tmp_path / "r.json") == 0o644


def test_a_failed_stage_leaves_nothing_and_an_existing_output_is_kept(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_output(target, [], force=False) as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    target.mkdir()
    with pytest.raises(InputError, match="--force"), staged_output(target, [], force=False):
        pass


def test_a_cut_that_would_not_fit_the_disk_is_refused_in_one_line_before_it_starts(tmp_path, monkeypatch):
    """Guards a tool that fills the disk midway (the llama.cpp peer's 2.1 GB float32 GGUF is the
    same check): the embedded model's cut needs about 5 MB; a disk with 1 MB free refuses it
    with the sizes, and nothing is written."""
    import shutil

    from bloom_runtime import files

    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: real(path)._replace(free=10**6))
    with pytest.raises(InputError, match=r"needs about 0\.0\d GB and .* has 0\.00 GB free"):
        cut_checkpoint("tiny", tmp_path / "cut", tp=2)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(files.shutil, "disk_usage", real)
    assert (cut_checkpoint("tiny", tmp_path / "cut", tp=2) / "manifest.json").is_file()
