"""Where a component comes from, written as one string: the one parser for presets, flags and run records.

Forms (anything else is a hub id, a registry name or a plain local path, left to the component's loader):

* ``pkg:REL`` a file or folder shipped inside the installed package (``pkg:weights/tinyworld/mllm``);
* ``pkg-adapters:NAME`` trained adapters shipped in the top-level ``adapters/`` folder;
* ``local-dir:SPEC`` open_clip's own scheme for a model folder (``open_clip_config.json`` + weights), where
  ``SPEC`` may itself be a ``pkg:`` source;
* ``random:NAME`` random weights of a named small architecture (plumbing and tests only).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from llavaseg.errors import InputError
from llavaseg.paths import cache_dir

__all__ = ["Source", "parse_source", "resolve_path", "weights_search_path", "find_weights_file", "in_hub_cache",
           "read_json", "HUB_ID"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""A Hugging Face repository id (``org/name``)."""

Scheme = Literal["package", "shipped-adapters", "local-dir", "random", "plain"]
_PREFIXES: tuple[tuple[str, Scheme], ...] = (("pkg-adapters:", "shipped-adapters"), ("pkg:", "package"),
                                             ("local-dir:", "local-dir"), ("random:", "random"))


@dataclass(frozen=True)
class Source:
    """A parsed source string: its scheme, the rest of the string, and the original text."""

    scheme: Scheme
    value: str
    raw: str

    @property
    def inner(self) -> Source:
        """For ``local-dir:SPEC`` the parsed ``SPEC``; the source itself otherwise."""
        return parse_source(self.value) if self.scheme == "local-dir" else self

    @property
    def shipped(self) -> bool:
        """Whether the files come with the package (a broken install, not a user error, if missing)."""
        return self.inner.scheme in ("package", "shipped-adapters")

    def path(self) -> Path | None:
        """The local file or folder this source names (``None`` for random weights); not checked to exist."""
        source = self.inner
        if source.scheme == "random":
            return None
        if source.scheme == "shipped-adapters":
            return Path(str(resources.files("llavaseg.shipped_adapters"))) / source.value
        if source.scheme == "package":
            return Path(str(resources.files("llavaseg"))) / source.value
        return Path(source.value).expanduser()

    def resolved(self) -> str:
        """The string a loader takes: ``pkg:`` parts replaced by install paths, the scheme prefix kept."""
        if self.scheme == "local-dir":
            return f"local-dir:{self.path()}"
        if self.scheme in ("package", "shipped-adapters"):
            return str(self.path())
        return self.raw


def parse_source(spec: str | Path) -> Source:
    text = str(spec)
    for prefix, scheme in _PREFIXES:
        if text.startswith(prefix):
            return Source(scheme, text[len(prefix):], text)
    return Source("plain", text, text)


def resolve_path(spec: str | Path) -> Path:
    """The local path of a source string (a ``pkg:`` part resolved inside the installed package)."""
    path = parse_source(spec).path()
    if path is None:
        raise ValueError(f"{spec!r} names random weights, not a file")
    return path


def weights_search_path() -> list[Path]:
    """Folders a bare weights file name is looked up in: ``$LLAVASEG_WEIGHTS`` (``os.pathsep``-separated),
    the current directory, then the user cache's ``weights/`` folder."""
    extra = [Path(p).expanduser() for p in os.environ.get("LLAVASEG_WEIGHTS", "").split(os.pathsep) if p]
    return [*extra, Path.cwd(), cache_dir("weights")]


def find_weights_file(source: str, what: str, hint: str) -> Path:
    """The file a (non-random) source names: a path, a ``pkg:`` source, or a bare name in the search path."""
    parsed = parse_source(source)
    path = parsed.path()
    assert path is not None
    if path.exists():
        return path
    if parsed.scheme == "plain" and os.sep not in source and "/" not in source:
        for folder in weights_search_path():
            if (folder / source).exists():
                return folder / source
        where = ", ".join(str(f) for f in weights_search_path())
        raise InputError(f"{what} {source} not found (looked in {where}); {hint}")
    if parsed.shipped:
        raise InputError(f"the shipped {what} {source} is missing from this install ({path})")
    raise InputError(f"{what} not found: {path}; {hint}")


def in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
