"""Files written atomically: a crash or a failing command never leaves a half-written file under the final name.

Every writer in the package (checkpoints, JSON, reference statistics, PNGs, shards, npz files) writes a temporary
file in the target's folder, fsyncs it and ``os.replace``s it onto the final name (atomic within one filesystem).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing (``wb`` or ``w``); on success it replaces ``path``, on error
    it vanishes and the previous file, if any, is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, file_mode())  # mkstemp creates 0600; results and checkpoints are shared like any file
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_mode() -> int:
    """0666 less the process's umask: the permissions a plainly created file would get."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(binary_file)`` on a temporary file and move it onto ``path`` once complete."""
    with atomic_open(path, "wb") as f:
        write(f)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def _json_default(o: Any) -> Any:
    import numpy as np
    import torch

    if isinstance(o, (np.generic, np.ndarray, torch.Tensor)):
        return o.tolist()  # a numpy scalar's tolist() is its item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON atomically (numpy / torch scalars and paths are converted)."""
    return atomic_write_text(path, json.dumps(payload, indent=2, default=_json_default) + "\n")
