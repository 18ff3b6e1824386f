"""Where a component comes from, written as one string: the one parser for presets, flags and run records.

Forms (anything else is a hub id, a registry name or a plain local path, left to the component's loader):

* ``pkg:REL`` a file or folder shipped inside the installed package (``pkg:weights/tinyworld/mllm``);
* ``pkg-adapters:NAME`` trained adapters shipped in the top-level ``adapters/`` folder;
* ``local-dir:SPEC`` open_clip's own scheme for a model folder (``open_clip_config.json`` + weights), where
  ``SPEC`` may itself be a ``pkg:`` source;
* ``random:NAME`` random weights of a named small architecture (plumbing and tests only).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

__all__ = ["Source", "parse_source", "resolve_path"]

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

