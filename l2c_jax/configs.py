"""Command-line configs: `--config configs/NAME.py[:ARG] [--config.KEY=VALUE ...] [--workdir DIR]`.

Uses ml_collections' config flags on a private FlagValues, so the library
never touches absl's global flags.
"""

from __future__ import annotations

import os
import sys

from l2c_jax.errors import ConfigError


def parse_config_flags(argv, doc: str = "", workdir_required: bool = False):
    """Returns (ConfigDict, workdir or None)."""
    from absl import flags
    from ml_collections import config_flags

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # config files import `configs.*`
        sys.path.insert(0, root)
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip())
        print("\nflags: --config FILE[:ARG]  --config.KEY=VALUE  --workdir DIR  --verbose")
        sys.exit(0)
    for i, a in enumerate(argv):  # ml_collections defers a missing file's error to first use: check now
        path = a.split("=", 1)[1] if a.startswith("--config=") else (
            argv[i + 1] if a == "--config" and i + 1 < len(argv) else None)
        if path is not None and not os.path.isfile(path.split(":", 1)[0]):
            raise ConfigError(f"config file not found: {path.split(':', 1)[0]}")
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True,
                                    sys_argv=["prog"] + list(argv))
    flags.DEFINE_string("workdir", None, "output directory", flag_values=fv)
    flags.DEFINE_boolean("verbose", False, "tracebacks on errors", flag_values=fv)
    try:
        fv(["prog"] + list(argv))
    except flags.Error as e:
        raise ConfigError(" ".join(str(e).split())) from None
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
        raise ConfigError("--config is required (e.g. --config configs/dit_smoke.py)")
    if workdir_required and not fv.workdir:
        raise ConfigError("--workdir is required")
    return config, fv.workdir
