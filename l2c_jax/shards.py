"""Samples on disk while a sampling job runs: shards with their indices, resumable, assembled into one npz.

A job of N images writes, per batch, `DIR/shard-<first index>.npz` holding
`indices` (int64) and `images` (uint8, NHWC). A shard is written under a
temporary name and renamed, so a killed process leaves a whole shard or none.
`DIR/job.json` holds the job's fingerprint (everything that decides the
images: model, router, sampler, seed, labels, count); a rerun of the same job
reads which indices are done and samples only the rest, and a different job
is refused instead of mixed in. `assemble` writes the single `arr_0` npz the
ADM evaluator reads, streaming in index order (at most one shard in memory),
after checking that every index 0..N-1 is present exactly once. The shards
are a job's scratch: the sampling job removes them once it has finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import zipfile
from typing import Optional, Sequence

import numpy as np

from l2c_jax.errors import ConfigError, L2CError

JOB_FILE = "job.json"
_SHARD = re.compile(r"^shard-(\d+)\.npz$")


class ShardError(L2CError):
    """The shards of a sampling job are missing, duplicated or unreadable."""


def _load(path: str, key: str) -> np.ndarray:
    try:
        with np.load(path) as z:
            return z[key]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ShardError(f"{path}: unreadable shard ({' '.join(str(e).split())[:200]}); delete it and rerun "
                         f"to sample its images again") from None


class ShardStore:
    """The shards of one sampling job in `directory`, for `num_images` images described by `job` (JSON-able)."""

    def __init__(self, directory: str, job: dict, num_images: int):
        self.directory = os.path.abspath(directory)
        self.num_images = int(num_images)
        self.job = json.loads(json.dumps(dict(job, num_images=self.num_images), sort_keys=True, default=str))

    # ------------------------------------------------------------------ the job
    def prepare(self) -> None:
        """Creates the directory and records the job there, unless a record is there already (process 0)."""
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, JOB_FILE)
        if not os.path.exists(path):
            # Shards without their job record (two jobs raced on one workdir before the lock existed) or a
            # folder of the user's own: neither may be adopted into this job's npz, nor deleted with it.
            there = [n for n in os.listdir(self.directory) if not _ours_partial(n)]
            if there:
                orphans = any(_SHARD.match(n) for n in there)
                kind = "shards of an unknown job" if orphans else "files this job did not write"
                raise ShardError(f"{self.directory} holds {kind} ({len(there)} entries, no {JOB_FILE}); move it "
                                 "away or use another --workdir (nothing was changed)")
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.job, f, indent=1, sort_keys=True)
            os.replace(tmp, path)

    def check(self) -> None:
        """Refuses a directory holding the unfinished shards of another job."""
        path = os.path.join(self.directory, JOB_FILE)
        try:
            with open(path) as f:
                there = json.load(f)
        except (OSError, ValueError) as e:
            raise ShardError(f"{path}: unreadable job record ({e})") from None
        if there != self.job:
            diff = sorted(k for k in set(there) | set(self.job) if there.get(k) != self.job.get(k))
            raise ConfigError(f"{self.directory} holds the unfinished samples of another job (it differs in "
                              f"{', '.join(diff)}); rerun that job to finish it, or use another --workdir "
                              f"(or delete {self.directory})")

    # ------------------------------------------------------------------ shards
    def paths(self) -> list:
        """The finished shards, in the order of their first index."""
        if not os.path.isdir(self.directory):
            return []
        names = [n for n in os.listdir(self.directory) if _SHARD.match(n)]
        return [os.path.join(self.directory, n) for n in sorted(names, key=lambda n: int(_SHARD.match(n).group(1)))]

    def done(self) -> np.ndarray:
        """The sorted indices already written."""
        parts = [_load(p, "indices") for p in self.paths()]
        return np.unique(np.concatenate(parts)) if parts else np.zeros((0,), np.int64)

    def remaining(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.num_images), self.done())

    def write(self, indices: Sequence[int], images: np.ndarray) -> str:
        indices = np.asarray(indices, np.int64)
        images = np.asarray(images, np.uint8)
        if len(indices) != len(images) or len(indices) == 0:
            raise ValueError(f"{len(indices)} indices for {len(images)} images")
        path = os.path.join(self.directory, f"shard-{int(indices[0]):09d}.npz")
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, indices=indices, images=images)
            f.flush()
            os.fsync(f.fileno())  # a preempted machine keeps what it reported written
        os.replace(tmp, path)
        return path

    def _where(self) -> tuple:
        """(shard paths, shard of each index, row of each index), checking every index is there exactly once."""
        paths = self.paths()
        shard_of = np.full((self.num_images,), -1, np.int64)
        row_of = np.zeros((self.num_images,), np.int64)
        for s, p in enumerate(paths):
            idx = _load(p, "indices")
            if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
                raise ShardError(f"{p}: indices {idx.min()}..{idx.max()} outside 0..{self.num_images - 1}")
            twice = idx[shard_of[idx] >= 0]
            if twice.size or len(np.unique(idx)) != len(idx):
                raise ShardError(f"{self.directory}: image {int(twice[0]) if twice.size else int(idx[0])} "
                                 f"is in more than one shard")
            shard_of[idx] = s
            row_of[idx] = np.arange(len(idx))
        missing = np.flatnonzero(shard_of < 0)
        if missing.size:
            raise ShardError(f"{self.directory}: {missing.size} of {self.num_images} images are missing "
                             f"(first: {int(missing[0])}); rerun the job to sample them")
        return paths, shard_of, row_of

    def _runs(self, indices: np.ndarray, shard_of, row_of):
        """Consecutive stretches of `indices` stored as consecutive rows of one shard: (shard, first row, count)."""
        start = 0
        for k in range(1, len(indices) + 1):
            if (k == len(indices) or shard_of[indices[k]] != shard_of[indices[start]]
                    or row_of[indices[k]] != row_of[indices[k - 1]] + 1):
                yield int(shard_of[indices[start]]), int(row_of[indices[start]]), k - start
                start = k

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """The images of `indices` (all of them must be written)."""
        paths, shard_of, row_of = self._where()
        indices = np.asarray(indices, np.int64)
        out, cached = [], (None, None)
        for s, r, c in self._runs(indices, shard_of, row_of):
            if cached[0] != s:
                cached = (s, _load(paths[s], "images"))
            out.append(cached[1][r:r + c])
        return np.concatenate(out)

    def assemble(self, path: str) -> str:
        """Writes all images in index order as `arr_0` of an uncompressed npz (np.savez's layout), streaming."""
        paths, shard_of, row_of = self._where()
        shape = _load(paths[0], "images").shape[1:]
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".partial"
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (self.num_images,) + tuple(shape)}
        cached = (None, None)
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, header)
                for s, r, c in self._runs(np.arange(self.num_images), shard_of, row_of):
                    if cached[0] != s:
                        cached = (s, _load(paths[s], "images"))
                        if cached[1].shape[1:] != shape:
                            raise ShardError(f"{paths[s]}: images of shape {cached[1].shape[1:]}, "
                                             f"{paths[0]} has {shape}")
                    f.write(np.ascontiguousarray(cached[1][r:r + c]).tobytes())
        os.replace(tmp, path)
        return path

    def remove(self) -> None:
        """Deletes the job's own files (shards, record, leftovers of killed writes) and the directory if that
        leaves it empty; anything else found there is kept."""
        if not os.path.isdir(self.directory):
            return
        for n in os.listdir(self.directory):
            if _SHARD.match(n) or n == JOB_FILE or _ours_partial(n):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.directory, n))
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)


def _ours_partial(name: str) -> bool:
    """A shard or job record being written when its process was killed."""
    return bool(re.match(r"^(shard-\d+\.npz|job\.json)\.tmp-\d+$", name))


def batches_of(remaining: np.ndarray, batch_size: int, process_index: int = 0,
               process_count: int = 1) -> list:
    """This process's batches of the remaining indices: consecutive chunks of `batch_size`, dealt round robin."""
    chunks = [remaining[i:i + batch_size] for i in range(0, len(remaining), batch_size)]
    return chunks[process_index::process_count]


def job_fingerprint(config, keys: Optional[Sequence[str]] = None) -> dict:
    """The config entries that decide a sampling job's images (not its batch size, strategy or outputs)."""
    keys = keys or ("model", "router", "vae", "sampler", "seed", "labels", "num_samples", "dtype", "cache_dtype")
    out = {}
    for k in keys:
        v = config.get(k)
        out[k] = v.to_dict() if hasattr(v, "to_dict") else (list(v) if isinstance(v, tuple) else v)
    return out
