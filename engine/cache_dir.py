"""Where Lumen keeps what it writes once per machine: the demo model and the built C kernels."""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """`$LUMEN_CACHE_DIR`, else `$XDG_CACHE_HOME/lumen`, else `~/.cache/lumen`."""
    # Empty variables count as unset, as the XDG base-directory spec asks.
    if explicit := os.environ.get("LUMEN_CACHE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "lumen"
    return Path.home() / ".cache" / "lumen"
