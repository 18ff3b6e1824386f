"""Where the library keeps files: the user cache and the weights shipped inside the package.

One resolver for the cache root, so every cached thing (generated tiny world, feature cache, training
checkpoints, downloaded wheels) moves together when a user sets ``$LLAVASEG_CACHE`` (e.g. to a larger disk).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

__all__ = ["cache_root", "cache_dir", "package_dir", "shipped_weights_dir", "portable_path", "TINY_WORLD_WEIGHTS"]


def cache_root() -> Path:
    """``$LLAVASEG_CACHE``, else ``$XDG_CACHE_HOME/llavaseg``, else ``~/.cache/llavaseg``."""
    explicit = os.environ.get("LLAVASEG_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llavaseg"


def cache_dir(*parts: str) -> Path:
    """A sub-folder of :func:`cache_root` (not created)."""
    return cache_root().joinpath(*parts)


def package_dir() -> Path:
    """The installed ``llavaseg`` package folder."""
    return Path(str(resources.files("llavaseg")))


def shipped_weights_dir(*parts: str) -> Path:
    """A folder of weights shipped in the package (``llavaseg/weights/...``)."""
    return package_dir().joinpath("weights", *parts)


TINY_WORLD_WEIGHTS = Path(__file__).resolve().parent / "weights" / "tinyworld"
"""The shipped tiny-world models (the recipes write here by default)."""


def portable_path(path: str | Path) -> str:
    """``path`` as a record should hold it: inside the user cache or the package, relative to a named root
    (``<cache>/...``, ``<llavaseg>/...``), so a shipped card does not carry one machine's install paths."""
    resolved = Path(path).expanduser().resolve()
    for label, root in (("<cache>", cache_root()), ("<llavaseg>", package_dir())):
        try:
            return f"{label}/{resolved.relative_to(root.expanduser().resolve()).as_posix()}"
        except ValueError:
            continue
    return str(path)
