"""What a result or a trained file was produced with, recorded so it can be reproduced (or known not to be).

Floating-point results depend on more than the code and the seed: the torch build, the thread count and the CPU
(the same build takes other kernels on another instruction set) all change summation order. Cards and result
files record :func:`machine` so a later comparison knows whether byte equality is to be expected.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, Field

__all__ = ["cpu_model", "machine", "same_machine_kind", "package_versions", "git_commit", "Provenance",
           "text_digest"]

PACKAGES = ("llavaseg", "torch", "torchvision", "transformers", "open_clip_torch", "segment-anything", "peft",
            "numpy", "pillow")


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, str | int]:
    """Python, torch build, CPU model and architecture, and torch's thread count."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_model(),
            "arch": platform.machine(), "threads": torch.get_num_threads()}


def same_machine_kind(recorded: dict | None, *, threads: int | None = None) -> bool:
    """Whether a run here can be expected to reproduce ``recorded``'s bytes: same torch build, CPU and
    architecture (and thread count, when the record holds one and ``threads`` is given)."""
    if not recorded:
        return False
    here = machine()
    if threads is not None:
        here["threads"] = threads
    keys = ["torch", "cpu", "arch"] + (["threads"] if "threads" in recorded and threads is not None else [])
    return all(str(recorded.get(key)) == str(here[key]) for key in keys)


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Installed versions of the packages results depend on (``"not installed"`` when absent)."""
    versions = {"python": platform.python_version()}
    for dist in PACKAGES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes) when llavaseg runs from a git checkout."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def text_digest(text: str) -> str:
    """Short content hash of a text (prompt templates are recorded by hash and compared by it)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Provenance(BaseModel):
    """What produced a result: package versions and commit, command line, machine, seeds, the component
    sources and identities, template hashes, and which parts were untrained."""

    versions: dict[str, str] = Field(default_factory=package_versions)
    commit: str | None = Field(default_factory=git_commit)
    command: list[str] = Field(default_factory=lambda: list(sys.argv))
    machine: dict = Field(default_factory=machine)
    seed: int | None = None
    route: str | None = None
    components: dict[str, dict] = Field(default_factory=dict)
    templates: dict[str, str] = Field(default_factory=dict)
    untrained: list[str] = Field(default_factory=list)
    notices: list[str] = Field(default_factory=list)
