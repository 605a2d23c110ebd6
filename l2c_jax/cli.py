"""Shared behaviour of the command-line entry points.

Bad input ends in one line on stderr and a non-zero exit; `--verbose` (or
L2C_VERBOSE=1) shows the traceback as well.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from l2c_jax.errors import L2CError


def run_main(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or os.environ.get("L2C_VERBOSE") == "1"
    try:
        code = main(argv)
    except L2CError as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # An unexpected failure still ends in one line unless asked.
        if verbose:
            traceback.print_exc()
        msg = " ".join(str(e).split())[:500]
        print(f"error: {type(e).__name__}: {msg} (run with --verbose for the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
