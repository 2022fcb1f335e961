"""One atomic file writer for everything cbd_fast writes (checkpoints, models, reports).

A reader never sees a partial file under the final name: the bytes go to a hidden temporary file
in the same folder, are fsynced, then renamed over the final name (``os.replace`` is atomic on
POSIX and Windows), and the folder is fsynced so the rename itself survives a crash.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_output", "TMP_SUFFIX"]

#: every temporary file ends with this (``.<final name>.<random>.tmp``)
TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was (absent, or the
    previous complete version), so no partial output ever carries the final name.

    Args:
        path: the final file name. Its folder must exist.

    Yields:
        the temporary ``Path`` to write to (same folder, hidden name ending in ``.tmp``).
    """
    final = Path(path)
    folder = final.parent if str(final.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {str(folder)!r} (for {str(final)!r})")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # make the bytes durable before the rename publishes them
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        with contextlib.suppress(OSError):  # the rename itself: fsync the folder (POSIX only)
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
