"""Peak memory and wall time of a job's phases (load, compile, sample, decode).

`Phases` samples the process's resident set size from a thread and charges
each sample to the phase running at that moment; on accelerators it also
reads the device's peak bytes in use (cumulative: the value at a phase's end
is the peak so far). No jax import at module level: the benchmark's FLOP
accounting and the tests use it without a backend.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
import time
from typing import Dict, Optional

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The current resident set size (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def maxrss_bytes() -> int:
    """The process's resident-set high-water mark since it started."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _libc():
    """glibc through ctypes, or None (another C library, or none reachable)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (glibc only)
            _LIBC.mallopt  # noqa: B018
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def release_free_heap() -> None:
    """Returns the C heap's free pages to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Compiling an XLA graph allocates and frees a lot of small objects; glibc
    keeps the freed memory in the process, fragmented, so every newly compiled
    step graph left ~0.1-0.15 GB of resident but unused heap at U-ViT-H/2 size
    (+1.5 GB over a DPM-Solver-2 router schedule's 11 graphs). The samplers call
    this after a call that compiled something: a few milliseconds, once per graph.
    """
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


MMAP_THRESHOLD = 1 << 20
LARGE_WEIGHTS_BYTES = 1 << 30
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def bound_heap_retention(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serves every allocation of `threshold` bytes or more with its own mapping, unmapped when freed
    (glibc `mallopt(M_MMAP_THRESHOLD)`; returns False where it does not apply).
    `MALLOC_MMAP_THRESHOLD_=1048576` in the environment does the same.

    XLA's CPU buffers come from malloc. glibc raises its mmap threshold to the size of each mapped block
    freed (up to 32 MiB), so after the first step a sampler's activations, cache and history buffers
    (9-75 MiB at DiT-XL/2 size) come from the heap instead, where steps of different graphs fragment it
    and the freed memory stays resident: a DiT-XL/2 TaylorSeer 3/2 job, 20 DDIM steps, peaked at
    8.09 GiB, and at 6.54 GiB with the threshold fixed at 1 MiB, at the same speed (2026-12-03,
    docs/performance.md). Setting it also stops the threshold from moving.

    The price is a page fault per page of every fresh buffer: nothing beside a DiT-XL/2 step's matmuls,
    but a quarter of the Quick start's wall time (digits DiT, batch 1,000: 90 s against 69 s), whose
    retention is a few MB. Hence `bound_large_models` for the console commands.
    """
    libc = _libc()
    return bool(libc) and bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


_BOUND_LARGE = False


def bound_large_models() -> None:
    """Makes `weights_restored` bound the heap (`bound_heap_retention`) once weights of
    `LARGE_WEIGHTS_BYTES` or more are restored in this process. `cli.run_main` calls it for every
    console command; a process that imports the library keeps glibc's defaults unless it asks."""
    global _BOUND_LARGE
    _BOUND_LARGE = True


def weights_restored(nbytes: int) -> None:
    """Called by `checkpoint.restore_params` with the bytes it restores, before the read where the
    shapes are known (the read's buffers are then mapped, not left in the heap), and after it
    (see `bound_large_models`)."""
    if _BOUND_LARGE and nbytes >= LARGE_WEIGHTS_BYTES:
        bound_heap_retention()


_LIBC = None


def device_peak_bytes() -> Optional[int]:
    """Peak bytes in use on the first local device (None on backends without memory stats, e.g. CPU)."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:
        return None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return None


class Phases:
    """Wall time and peak RSS per named phase; a phase entered twice accumulates.

        phases = Phases()
        with phases("load"): ...
        with phases("sample"): ...
        phases.summary()  # {"load": {"wall_s", "peak_rss_bytes", "rss_end_bytes", "device_peak_bytes"}, ...}
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.rows: Dict[str, dict] = {}
        self._current: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self):
        name = self._current
        if name is not None:
            row = self.rows[name]
            row["peak_rss_bytes"] = max(row["peak_rss_bytes"], rss_bytes())

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    @contextlib.contextmanager
    def __call__(self, name: str):
        row = self.rows.setdefault(name, dict(wall_s=0.0, peak_rss_bytes=0, rss_end_bytes=0,
                                              device_peak_bytes=None))
        outer, self._current = self._current, name
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        self._sample()
        t0 = time.perf_counter()
        try:
            yield row
        finally:
            row["wall_s"] += time.perf_counter() - t0
            self._sample()
            row["rss_end_bytes"] = rss_bytes()
            row["device_peak_bytes"] = device_peak_bytes()
            self._current = outer

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def summary(self) -> Dict[str, dict]:
        return {k: dict(v) for k, v in self.rows.items()}

    def lines(self):
        """One human-readable line per phase."""
        for name, r in self.rows.items():
            dev = "" if r["device_peak_bytes"] is None else f", device peak {r['device_peak_bytes'] / 2**30:.2f} GiB"
            yield (f"{name:<8} {r['wall_s']:8.2f} s   peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB{dev}")
