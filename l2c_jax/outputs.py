"""One rule for every output: a job never replaces or deletes what it did not create unless told to.

Commands check their outputs before any work (`check_output`): an output that
is one of the job's inputs, or holds one, is refused whatever the flags say (a
diffusers folder converted in place lost its config.json); an existing file or
non-empty directory is refused unless `overwrite`. What they write goes to a
temporary name beside the output and is renamed into place when whole
(`publish`), so an interrupted or failed job leaves the old output as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterable, Optional

from l2c_jax.errors import ConfigError

PARTIAL = ".partial"  # suffix of an output being written (ours by name: a leftover of a killed job is removed)
REPLACED = ".replaced"  # the previous output while the new one is renamed in (with overwrite)


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def holds(outer: str, inner: str) -> bool:
    """Whether `inner` is `outer` or lies inside it (after resolving links)."""
    a, b = _real(outer), _real(inner)
    return a == b or b.startswith(a.rstrip(os.sep) + os.sep)


def check_output(path: str, *, overwrite: bool = False, inputs: Iterable[Optional[str]] = (),
                 flag: str = "--out", hint: str = "pass --overwrite to replace it") -> None:
    """Refuses, before any work, an output that is (or holds) an input, or exists and `overwrite` is off.

    An empty directory counts as free. The message names the flag and the path, and says nothing was written.
    """
    for src in inputs:
        if src and os.path.exists(src) and holds(path, src):
            raise ConfigError(f"{flag} {path} is (or holds) the input {src}; write to another path "
                              "(nothing was written)")
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
        return
    if not overwrite:
        what = "directory" if os.path.isdir(path) else "file"
        raise ConfigError(f"{flag} {path}: a {what} exists there already; {hint}, or choose another path "
                          "(nothing was written)")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def staging_path(path: str) -> str:
    """The temporary name an output is written under; a leftover there (a killed job's) is removed."""
    tmp = os.path.abspath(os.fspath(path)).rstrip(os.sep) + PARTIAL
    _remove(tmp)
    return tmp


def publish(tmp: str, path: str) -> None:
    """Renames the finished `tmp` to `path`, replacing what is there (the caller checked `overwrite`)."""
    path = os.path.abspath(os.fspath(path)).rstrip(os.sep)
    if os.path.lexists(path):
        old = path + REPLACED
        _remove(old)
        os.rename(path, old)  # the old output stays whole until the new one is in place
        os.rename(tmp, path)
        _remove(old)
    else:
        os.rename(tmp, path)


@contextlib.contextmanager
def staged(path: str):
    """Yields a temporary path to write `path`'s new content to (file or directory); renamed into place
    when the block ends without an error, removed when it fails."""
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(parent, exist_ok=True)
    tmp = staging_path(path)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            _remove(tmp)
        raise
    publish(tmp, path)
