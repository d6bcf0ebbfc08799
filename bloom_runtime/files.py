"""Writing outputs so that nothing is lost: through a temporary path, then a rename.

An interrupted write leaves the previous file (or no file), never half of one; a
tool's output directory appears whole or not at all. Temporary files and
directories are made with the permissions the umask gives ordinary ones
(`tempfile` makes them owner-only), so a serving account can read what we write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, payload: Any) -> None:
    """`payload` as indented UTF-8 JSON (non-ASCII kept readable), replaced atomically."""
    text = json.dumps(payload, ensure_ascii=False, indent=2) + "\n"
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextmanager
def staged_output(output: str | os.PathLike, inputs: list[Path | None], force: bool,
                  needs: int = 0) -> Iterator[Path]:
    """A fresh temporary directory that becomes `output` when the block succeeds.

    Refuses an `output` that overlaps any of `inputs` (inputs are never written), that
    exists, unless `force`, or whose `needs` (bytes the block will write, where the caller
    knows) exceed the free space there: one line before any work, where a full disk would
    fail it midway. A failed or interrupted block leaves no trace.
    """
    output = Path(output).resolve()
    for source in filter(None, inputs):
        source = source.resolve()
        if output == source or source in output.parents or output in source.parents:
            raise InputError(f"output {output} overlaps the input {source}; inputs are never written")
    if output.exists() and not force:
        raise InputError(f"output {output} exists; pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(output.parent).free
    if needs > free:
        raise InputError(f"output {output}: writing it needs about {needs / 1e9:.2f} GB and "
                         f"{output.parent} has {free / 1e9:.2f} GB free")
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        yield staging
        _make_readable(staging)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_readable(directory: Path) -> None:
    """Give the staged tree the modes the umask gives new files and directories."""
    mask = _umask()
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
