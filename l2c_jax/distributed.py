"""One job over many processes: `jax.distributed` set-up, who reports, and barriers.

Every command calls `initialize` before JAX touches a device (through
`l2c_jax.cli.parse_config_flags`):

- explicit `--coordinator_address HOST:PORT --num_processes N --process_id I`
  start the distributed runtime with those values;
- otherwise a cluster JAX knows how to read (a TPU VM pod slice, a SLURM
  step, Open MPI, Kubernetes) with more than one process starts it with
  JAX's own detection. `jax.distributed.initialize()` without a cluster
  raises, so the cluster is detected first;
- else the job is one process, as it always was. L2C_DISTRIBUTED=0 skips the
  detection (one process even inside a multi-task allocation).

On the CPU, cross-process collectives need an implementation: gloo is chosen
unless one is set. Timeouts: JAX's defaults for start-up (300 s) and
heartbeats (100 s); the shutdown wait is long (a day) because process 0
assembles and scores the samples after the others have finished theirs, and
the others must not give up on it. L2C_DISTRIBUTED_TIMEOUT_S lowers all three
(the tests use it).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Optional

import jax

from l2c_jax.errors import ConfigError, L2CError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "L2C_DISTRIBUTED_TIMEOUT_S"
SHUTDOWN_TIMEOUT_S = 24 * 3600


def detect_cluster() -> Optional[str]:
    """The name of the multi-process cluster JAX's detection would use here ("slurm", "gcetpu", ...), or None.

    A cluster of one process (a single-host TPU VM, `srun -n 1`) counts as none.
    JAX keeps its detectors in a private registry; if that moves, this sees no
    cluster and the explicit flags still work.
    """
    if os.environ.get("L2C_DISTRIBUTED") == "0":
        return None
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # pragma: no cover - a JAX without the registry
        return None
    for env in ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present() and int(env.get_process_count()) > 1:
                return env.name
        except Exception:  # a detector that cannot read its environment (no metadata server, ...) is no cluster
            continue
    return None


def _timeouts() -> dict:
    lowered = os.environ.get(TIMEOUT_ENV)
    if lowered:
        s = int(lowered)
        return dict(initialization_timeout=s, heartbeat_timeout_seconds=s, shutdown_timeout_seconds=s)
    return dict(shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
    """Starts `jax.distributed` when asked (flags) or when a multi-process cluster is detected; True if started.

    Must run before the first JAX computation; a second call, or one after
    `jax.distributed` started elsewhere, changes nothing.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ConfigError("multi-process runs need all of --coordinator_address, --num_processes and --process_id "
                          "(or none, inside a cluster JAX detects)")
    if jax.distributed.is_initialized():
        return True
    if all(given):
        if int(num_processes) < 1 or not 0 <= int(process_id) < int(num_processes):
            raise ConfigError(f"--process_id must lie in [0, {int(num_processes) - 1}], got {process_id}")
        if ":" not in coordinator_address:
            raise ConfigError(f"--coordinator_address must be HOST:PORT, got {coordinator_address!r}")
        if int(num_processes) == 1:
            return False
        kw = dict(coordinator_address=coordinator_address, num_processes=int(num_processes),
                  process_id=int(process_id))
    else:
        cluster = detect_cluster()
        if cluster is None:
            return False
        kw = dict(cluster_detection_method=cluster)
    # CPU arrays across processes need a collectives implementation (newer JAX defaults to gloo).
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kw, **_timeouts())
    except RuntimeError as e:  # e.g. JAX already used a device in this process
        raise ConfigError(f"cannot start jax.distributed: {' '.join(str(e).split())[:300]}") from None
    log.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def is_main() -> bool:
    """Process 0: the one that prints, writes the single outputs and shows progress bars."""
    return jax.process_index() == 0


def main_only(report: Callable) -> Callable:
    """`report` on process 0, a no-op elsewhere (summaries print once)."""
    return report if is_main() else (lambda *a, **k: None)


def log_format(fmt: str = "%(asctime)s %(message)s") -> str:
    """A logging format whose lines carry the process index when there are several processes."""
    if jax.process_count() > 1:
        return f"[process {jax.process_index()}/{jax.process_count()}] {fmt}"
    return fmt


def barrier(name: str) -> None:
    """Waits until every process gets here (nothing to wait for in a one-process job)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def on_main(fn: Callable, name: str):
    """Runs `fn` on process 0 only and lets every process learn how it went: a refusal there (an L2CError,
    e.g. a workdir held by another job) is raised on every process with the same one line, instead of
    leaving the others waiting at the next barrier. Returns fn's result on process 0, None elsewhere."""
    if jax.process_count() == 1:
        return fn()
    import numpy as np
    from jax.experimental import multihost_utils

    result, message, error = None, b"", None
    if is_main():
        try:
            result = fn()
        except L2CError as e:
            error, message = e, str(e).encode()[:_MESSAGE_BYTES] or b"refused"
    buf = np.zeros((_MESSAGE_BYTES,), np.uint8)
    buf[:len(message)] = np.frombuffer(message, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    if got.any():
        text = bytes(got[got > 0].astype(np.uint8)).decode(errors="replace")
        if error is not None:
            raise error
        raise ConfigError(f"process 0 refused the job ({name}): {text}")
    return result


_MESSAGE_BYTES = 1024


@contextlib.contextmanager
def hold_workdir(workdir: str, kind: str):
    """The workdir is this job's for the block: process 0 locks it and records its kind
    (`l2c_jax.workdirs`: a model directory, a workdir of another kind or one a live job holds is
    refused before any work), and every process raises the same line if it was refused."""
    from l2c_jax import workdirs

    with contextlib.ExitStack() as held:
        def take():
            held.enter_context(workdirs.lock(workdir))
            workdirs.claim(workdir, kind)

        on_main(take, f"{kind} workdir")
        yield
