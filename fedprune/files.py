"""Files replaced whole: a reader (another process, a resumed run) sees the old file or the new one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a file of this process's own next to ``path``, then rename it to ``path``
    (several processes may write the same file at once: the last rename wins, none is torn)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)
