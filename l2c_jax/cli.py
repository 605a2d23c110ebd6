"""Shared behaviour of the command-line entry points: errors, and configs from flags.

Bad input ends in one line on stderr and a non-zero exit; `--verbose` (or
L2C_VERBOSE=1) shows the traceback as well.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from l2c_jax import distributed, memory, resources
from l2c_jax.errors import ConfigError, L2CError


def run_main(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Runs a command's `main`, turning errors into one line and an exit status.

    With `argv` None (a process's entry point: the console commands and scripts) the process is about
    to end on an error, and what the interpreter prints while shutting down is discarded after the
    error line (`_last_line`); with an explicit `argv` (a caller in the same process) stderr is left
    alone.
    """
    quiet = argv is None  # a process's entry point: the process ends with the error
    if quiet:
        memory.bound_large_models()  # a large model's freed buffers go back to the OS (l2c_jax.memory)
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or os.environ.get("L2C_VERBOSE") == "1"
    quiet = quiet and not verbose
    try:
        code = main(argv)
    except L2CError as e:
        if verbose:
            traceback.print_exc()
        _last_line(f"error: {e}", quiet)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # An unexpected failure still ends in one line unless asked.
        if verbose:
            traceback.print_exc()
        msg = " ".join(str(e).split())[:500]
        _last_line(f"error: {type(e).__name__}: {msg} (run with --verbose for the traceback)", quiet)
        sys.exit(1)
    sys.exit(code or 0)


def _last_line(line: str, quiet: bool) -> None:
    """Writes the error line; when `quiet`, the last thing the process writes to stderr.

    A failed orbax restore leaves reads in TensorStore's threads that fail afterwards: their callbacks
    print tracebacks straight to file descriptor 2 (C-level, past every Python hook), some while the
    error line is being written, others when the interpreter shuts down. Nothing written after the
    error helps the user (`--verbose` keeps it all), so descriptor 2 is pointed at /dev/null first
    and the line is written to a copy of the original.
    """
    sys.stderr.flush()
    if quiet:
        try:
            fd = sys.stderr.fileno()
            real = os.dup(fd)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
            os.write(real, (line + "\n").encode())
            os.close(real)
            return
        except (OSError, ValueError, AttributeError):  # no real file descriptor (captured in-process)
            pass
    print(line, file=sys.stderr)


def parse_config_flags(argv, doc: str = "", workdir_required: bool = False):
    """Returns (ConfigDict, workdir or None), after starting `jax.distributed` where asked
    (`l2c_jax.distributed.initialize`: the multi-process flags, or a detected cluster)."""
    from absl import flags
    from ml_collections import config_flags

    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip())
        print("\nflags: --config FILE[:ARG]  --config.KEY=VALUE  --workdir DIR  --verbose\n"
              "       --coordinator_address HOST:PORT --num_processes N --process_id I  (one process of a "
              "multi-process job; inside a TPU pod slice, SLURM or Open MPI job these are detected)")
        sys.exit(0)
    argv = list(argv)
    for i, a in enumerate(argv):  # ml_collections defers a missing file's error to first use: check now
        j = i if a.startswith("--config=") else (i + 1 if a == "--config" and i + 1 < len(argv) else None)
        if j is None:
            continue
        prefix, value = ("--config=", a.split("=", 1)[1]) if j == i else ("", argv[j])
        file, sep, arg = value.partition(":")
        found = resources.config_file(file)  # outside a checkout, the shipped configs by name
        if not os.path.isfile(found):
            raise ConfigError(f"config file not found: {file}")
        argv[j] = prefix + found + sep + arg
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True,
                                    sys_argv=["prog"] + list(argv))
    flags.DEFINE_string("workdir", None, "output directory", flag_values=fv)
    flags.DEFINE_boolean("verbose", False, "tracebacks on errors", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process jobs)", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "processes of the job", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index, 0..num_processes-1", flag_values=fv)
    try:
        fv(["prog"] + list(argv))
    except flags.Error as e:
        msg = " ".join(str(e).split())
        # A config's own error (e.g. an unknown variant) arrives wrapped in ml_collections' traceback text.
        for marker in ("ValueError: ", "KeyError: ", "TypeError: "):
            if "Traceback" in msg and marker in msg:
                msg = msg.rsplit(marker, 1)[1]
                break
        raise ConfigError(msg) from None
    except (FileNotFoundError, OSError) as e:
        raise ConfigError(f"cannot read config: {e}") from None
    except (KeyError, AttributeError) as e:
        raise ConfigError(f"unknown config key in an override: {' '.join(str(e).split())}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid config override: {' '.join(str(e).split())}") from None
    try:
        config = fv.config
    except Exception as e:  # ml_collections defers a failed load to the first access
        msg = " ".join(str(e).split())
        raise ConfigError(f"cannot load the config: {msg[msg.find('Attempted'):] if 'Attempted' in msg else msg}") from None
    if config is None:
        raise ConfigError("--config is required (e.g. --config configs/dit_sample.py:smoke)")
    if workdir_required and not fv.workdir:
        raise ConfigError("--workdir is required")
    # Before anything touches a device: the distributed runtime, when flags or a cluster ask for it.
    distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    return config, fv.workdir
