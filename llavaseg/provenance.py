"""What a result or a trained file was produced with, recorded so it can be reproduced (or known not to be).

Floating-point results depend on more than the code and the seed: the torch build, the thread count and the CPU
(the same build takes other kernels on another instruction set) all change summation order. Cards and result
files record :func:`machine` so a later comparison knows whether byte equality is to be expected.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

__all__ = ["cpu_model", "machine", "same_machine_kind"]


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
