"""Where cope-local keeps data, and how it writes files without losing them.

All user data lives under one folder: `COPE_HOME` if set, else the platform's
user data dir (platformdirs). Writes go to a temp file in the same folder,
are fsynced and renamed into place, so a crash or Ctrl-C leaves either the
old file or the new one, never half of one. Files holding user text are 0600.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

APP_NAME = "cope-local"


def home() -> Path:
    """Root of all user data (profiles, adapters, drafts)."""
    env = os.environ.get("COPE_HOME")
    if env:
        root = Path(env).expanduser()
    else:
        import platformdirs

        root = Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


def profiles_dir() -> Path:
    path = home() / "profiles"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a dir be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, mode: int = 0o600) -> Iterator[Path]:
    """Yield a temp path beside `dest`; on success fsync it and rename it to `dest`.

    On any exception (KeyboardInterrupt included) the temp file is removed and
    `dest` keeps its previous content.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(dest: str | os.PathLike, data: bytes, mode: int = 0o600) -> Path:
    with atomic_path(dest, mode) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def atomic_write_text(dest: str | os.PathLike, text: str, mode: int = 0o600) -> Path:
    return atomic_write_bytes(dest, text.encode("utf-8"), mode)
