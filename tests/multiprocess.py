"""Real multi-process jobs on localhost for the tests: free ports, bounded time, every process reaped.

Each process runs a console command as `python -m l2c_jax.commands.NAME` on
the CPU with `devices` forced host devices, joined by `jax.distributed`
(gloo collectives) through the explicit flags; the distributed runtime's
start-up, heartbeat and shutdown timeouts are lowered. Every process starts
in its own session (process group), which is killed whole when the test
ends, passes or fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

from conftest import ROOT


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict:
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             L2C_DISTRIBUTED_TIMEOUT_S="60", L2C_DISTRIBUTED="0", TF_CPP_MIN_LOG_LEVEL="2")
    return e


class Job:
    """`processes` processes of one command; `wait` bounds their time, `kill` ends them, `logs` shows them."""

    def __init__(self, command: str, args, processes: int, devices: int, logdir):
        self.logs = [os.path.join(str(logdir), f"{command}-{i}-{time.monotonic_ns()}.log") for i in range(processes)]
        port = free_port()
        self.procs = []
        for i in range(processes):
            extra = ([] if processes == 1 else
                     ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(processes),
                      "--process_id", str(i)])
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", f"l2c_jax.commands.{command}", *args, *extra], cwd=ROOT,
                    env=env(devices), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def output(self, i: int = 0) -> str:
        with open(self.logs[i]) as f:
            return f.read()

    def wait(self, timeout: float) -> list:
        """The exit codes, after all processes ended; kills them all if `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"processes still running after {timeout} s; output of process 0:\n"
                                     + self.output(0)[-3000:]) from None
        return [p.returncode for p in self.procs]

    def check(self, timeout: float) -> None:
        codes = self.wait(timeout)
        bad = [i for i, c in enumerate(codes) if c != 0]
        assert not bad, f"process {bad[0]} exited with {codes[bad[0]]}:\n{self.output(bad[0])[-3000:]}"

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait(30)


@contextlib.contextmanager
def job(command: str, args, processes: int = 2, devices: int = 2, logdir="/tmp"):
    j = Job(command, list(args), processes, devices, logdir)
    try:
        yield j
    finally:
        j.kill()
