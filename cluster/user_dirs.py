"""Per-user private directories for what Tidal keeps on a machine (port leases, and the like).

A fixed path under a shared ``/tmp`` is open to every user of the machine: another user can create it first,
then read, plant or delete what Tidal puts there. Tidal's default directories are the user's own instead,
``<tempdir>/tidal-<uid>/...`` (mode 0700), and a directory that another user owns, or that others may write
to, is refused with a message that says how to fix it. Pure: os, stat and tempfile only.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class UnsafeDirectoryError(PermissionError):
    """A directory Tidal will not use: another user owns it, or others may write to it."""


def user_temp_root() -> Path:
    """``<tempdir>/tidal-<uid>``: this user's root for Tidal's machine-local files, e.g. ``/tmp/tidal-1000``."""
    return Path(tempfile.gettempdir()) / f"tidal-{os.getuid()}"


def ensure_private_dir(path: str | os.PathLike, *, what: str = "directory", env_var: str | None = None) -> Path:
    """Creates ``path`` (mode 0700) if it is missing and checks that it is this user's alone.

    Args:
        path: the directory; missing parents are created with mode 0700 too.
        what: its role, for the message (``"port lease directory"``).
        env_var: the environment variable that chooses it, named in the message as the way out.

    Raises:
        UnsafeDirectoryError: ``path`` is not a directory, another user owns it, or its group or others
            may write to it.
    """
    p = Path(path)
    for d in [*reversed(p.parents), p]:
        if not d.exists():
            d.mkdir(mode=0o700, exist_ok=True)  # one level at a time: mkdir -p would use the default mode
    st = os.stat(p)
    way_out = f"; set {env_var} to a directory of your own" if env_var else ""
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectoryError(f"{what} {p} is not a directory{way_out}")
    uid = os.getuid()
    if st.st_uid != uid:
        raise UnsafeDirectoryError(
            f"{what} {p} is owned by uid {st.st_uid}, not by you (uid {uid}): refusing to use it{way_out}"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDirectoryError(
            f"{what} {p} is writable by others (mode {stat.S_IMODE(st.st_mode):o}): refusing to use it; "
            f"`chmod 700 {p}`{way_out.replace(';', ' or', 1)}"
        )
    return p
