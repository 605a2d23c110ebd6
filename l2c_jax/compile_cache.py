"""JAX's persistent compilation cache, switched on once for the library and the scripts.

Step graphs of a DiT-XL/2 take seconds to minutes to compile; with the cache a
second process (or a second job) loads them from disk. `ensure_enabled` is
what `l2c_jax.sample` and the jobs call: it leaves a directory the user set
(through `jax.config` or `JAX_COMPILATION_CACHE_DIR`) alone, and
`L2C_JAX_CACHE_DIR=""` turns it off.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "l2c_jax", "xla")


def enable_compilation_cache(cache_dir: Optional[str] = None) -> Optional[str]:
    """Turns on JAX's persistent compilation cache for every executable (returns the directory).

    cache_dir: None -> $L2C_JAX_CACHE_DIR or ~/.cache/l2c_jax/xla; "" -> leave it off.
    Every entry is cached (min compile time 0 s, any size), so a second
    process loads the step graphs instead of compiling them.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("L2C_JAX_CACHE_DIR", DEFAULT_CACHE_DIR)
    if not cache_dir:
        return None
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    os.makedirs(cache_dir, exist_ok=True)
    current = jax.config.jax_compilation_cache_dir
    if current and os.path.abspath(current) != cache_dir:
        # The cache object is created once per process; point it at the new directory.
        try:
            from jax._src import compilation_cache as _cc
            _cc.reset_cache()
        except Exception:  # pragma: no cover - private API moved: the old directory stays in use
            pass
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return cache_dir


def ensure_enabled() -> Optional[str]:
    """The cache directory in use, enabling the default one if none is configured yet."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    return enable_compilation_cache(None)


def from_setting(setting: Optional[str] = "default") -> Optional[str]:
    """A config's `compilation_cache_dir`: "default" (the default directory), "off", or a path."""
    if setting in (None, "default"):
        return enable_compilation_cache(None)
    return enable_compilation_cache("" if setting == "off" else setting)
