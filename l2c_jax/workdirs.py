"""Job workdirs: what wrote them, and one job at a time.

A sampling or training job records its kind (and, for sampling, the finished
job's fingerprint) in WORKDIR/.l2c_workdir.json, so that a workdir of another
kind (a converted model directory given to router training replaced its
config.json) or holding another job's outputs is refused before any work
(`claim`). While a job runs it holds WORKDIR/.l2c.lock (`lock`): a second
job on the same workdir is refused at once with the holder's process id; a
lock left by a process that is gone (killed, machine rebooted) is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Optional

from l2c_jax.errors import ConfigError

RECORD = ".l2c_workdir.json"
LOCK = ".l2c.lock"
MODEL_CONFIG = "config.json"  # l2c_jax.checkpoint.CONFIG_FILE; a model directory also has params/


def read_record(workdir: str) -> Optional[dict]:
    path = os.path.join(workdir, RECORD)
    try:
        with open(path) as f:
            rec = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable workdir record ({e}); delete it if the workdir is yours") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("kind"), str):
        raise ConfigError(f"{path}: not a workdir record; delete it if the workdir is yours")
    return rec


def write_record(workdir: str, record: dict) -> None:
    path = os.path.join(workdir, RECORD)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


def is_model_dir(workdir: str) -> bool:
    """A directory written by convert/ or Model.save (config.json with a family, params/)."""
    if not os.path.isdir(os.path.join(workdir, "params")):
        return False
    try:
        with open(os.path.join(workdir, MODEL_CONFIG)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "family" in meta


def claim(workdir: str, kind: str, legacy: Optional[str] = None) -> dict:
    """Refuses a model directory or a workdir recorded for another kind of job; records `kind` otherwise.

    `legacy`: a file whose presence marks a workdir of this kind written before records existed (accepted
    and recorded). Returns the record (with any fields the earlier job stored).
    """
    workdir = os.path.abspath(workdir)
    if is_model_dir(workdir):
        raise ConfigError(f"--workdir {workdir} is a model directory (written by convert/); give the {kind} job a "
                          "directory of its own (nothing was changed)")
    rec = read_record(workdir) if os.path.isdir(workdir) else None
    if rec is not None and rec["kind"] != kind:
        raise ConfigError(f"--workdir {workdir} belongs to a {rec['kind']} job ({RECORD}); give the {kind} job a "
                          "directory of its own (nothing was changed)")
    if rec is None:
        rec = {"kind": kind}
        os.makedirs(workdir, exist_ok=True)
        write_record(workdir, rec)
    return rec


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder(path: str) -> tuple:
    try:
        with open(path) as f:
            pid, host = f.read().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None, None  # being written, or damaged


@contextlib.contextmanager
def lock(workdir: str):
    """Holds WORKDIR/.l2c.lock for the block; refuses a workdir another live process holds."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(os.path.abspath(workdir), LOCK)
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, host = _holder(path)
            stale = pid is not None and host == socket.gethostname() and not _alive(pid)
            if attempt == 0 and stale:
                # Renaming first makes the takeover atomic: of two jobs finding the same stale lock, one
                # renames it and creates the new lock; the other's rename fails and it is refused below.
                with contextlib.suppress(OSError):
                    os.rename(path, f"{path}.stale-{os.getpid()}")
                    os.remove(f"{path}.stale-{os.getpid()}")
                continue
            who = f"process {pid} on {host}" if pid is not None else "another job"
            raise ConfigError(f"--workdir {workdir} is in use by {who} ({path}); wait for it to finish or use "
                              f"another --workdir (delete {path} only if that job is gone)") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        yield
    finally:
        if _holder(path) == (os.getpid(), socket.gethostname()):
            with contextlib.suppress(OSError):
                os.remove(path)
