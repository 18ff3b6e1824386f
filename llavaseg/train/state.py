"""One resumable training-state format for every trainer (adapters, ``[SEG]``, the tiny-world recipes).

A killed run must resume to exactly the weights an uninterrupted run ends with, so a state holds everything a
step depends on: the trained tensors, the optimiser's moments and parameter groups, the scheduler's counters,
the torch / numpy / Python RNG states and the step, plus whatever record the trainer keeps (loss curves...).

Layout of a state folder::

    state.json                  format, step, identity, optimiser groups, scheduler, RNG states, extra record
    state-<step>.safetensors    model/<name>, optim/<index>/<slot>, rng/torch

Tensors are written first and ``state.json`` last, each atomically, so the JSON is the commit point: a kill at
any moment leaves the previous complete state. ``identity`` is what produced the run (its config and, where the
trainer knows them, data, prompts and frozen-model identities): a state whose identity differs is refused with
the differing keys named, never resumed. No pickle is involved (safetensors + JSON).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llavaseg.atomic import atomic_write, atomic_write_text
from llavaseg.errors import CheckpointMismatchError
from llavaseg.models.common import WEIGHT_FILE_ERRORS, weights_error

__all__ = ["STATE_FORMAT", "STATE_FILE", "ResumedState", "save_state", "load_state", "peek_state",
           "identity_differences"]

STATE_FORMAT = "llavaseg-train-state-v1"
STATE_FILE = "state.json"


@dataclass
class ResumedState:
    """What :func:`load_state` restored: the step, the model tensors (for the caller to load) and the record."""

    step: int
    model: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


def identity_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two identities (JSON-normalised, so tuples equal lists)."""
    a, b = json.loads(json.dumps(recorded, default=str)), json.loads(json.dumps(wanted, default=str))
    return sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    state = optimizer.state_dict()
    tensors = {f"optim/{index}/{name}": torch.as_tensor(value).detach().cpu().contiguous()
               for index, slots in state["state"].items() for name, value in slots.items()}
    return tensors, state["param_groups"]


def save_state(directory: Path | str, *, step: int, identity: dict[str, Any], model: dict[str, torch.Tensor],
               optimizer: torch.optim.Optimizer, scheduler: Any = None, numpy_rng: np.random.Generator | None = None,
               python_rng: random.Random | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a complete training state into ``directory`` (see the module docstring); return ``state.json``."""
    directory = Path(directory)
    tensors = {f"model/{name}": value.detach().cpu().contiguous().clone() for name, value in model.items()}
    optim_tensors, groups = _optimizer_tensors(optimizer)
    tensors.update(optim_tensors)
    tensors["rng/torch"] = torch.get_rng_state()
    tensor_file = f"state-{step:08d}.safetensors"
    atomic_write(directory / tensor_file, lambda tmp: save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT}))
    payload = {
        "format": STATE_FORMAT, "step": step, "tensors": tensor_file, "identity": identity,
        "optimizer_groups": groups,
        "scheduler": ({k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
                      if scheduler is not None else None),
        "numpy_rng": numpy_rng.bit_generator.state if numpy_rng is not None else None,
        "python_rng": list(_jsonable(python_rng.getstate())) if python_rng is not None else None,
        "extra": extra or {},
    }
    path = directory / STATE_FILE
    atomic_write_text(path, json.dumps(payload, indent=1, default=str))
    for old in directory.glob("state-*.safetensors"):
        if old.name != tensor_file:
            old.unlink(missing_ok=True)
    return path


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _read(directory: Path) -> dict[str, Any] | None:
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointMismatchError(f"{path}: unreadable training state ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise CheckpointMismatchError(f"{path}: not a {STATE_FORMAT} training state")
    return payload


def peek_state(directory: Path | str) -> ResumedState | None:
    """The step and record of a saved state without restoring anything (a trainer that must build its
    optimiser to match the record, e.g. per training stage, reads this first); no tensors are loaded."""
    payload = _read(Path(directory))
    if payload is None:
        return None
    return ResumedState(step=int(payload["step"]), model={}, extra=dict(payload.get("extra") or {}))


def load_state(directory: Path | str, *, identity: dict[str, Any], optimizer: torch.optim.Optimizer,
               scheduler: Any = None, numpy_rng: np.random.Generator | None = None,
               python_rng: random.Random | None = None) -> ResumedState | None:
    """Restore a state written by :func:`save_state`; ``None`` when ``directory`` holds none.

    The optimiser, scheduler and RNGs are restored in place; the model tensors are returned for the caller to
    load (they may belong to several modules). A state of another identity is refused.
    """
    directory = Path(directory)
    payload = _read(directory)
    if payload is None:
        return None
    differs = identity_differences(payload.get("identity", {}), identity)
    if differs:
        raise CheckpointMismatchError(
            f"training state in {directory} belongs to a run with different settings ({', '.join(differs)}); "
            "use another checkpoint folder or start over without resuming")
    tensor_path = directory / Path(str(payload["tensors"])).name  # never follow a path out of the folder
    try:
        tensors = load_file(str(tensor_path))
    except WEIGHT_FILE_ERRORS as exc:  # missing, truncated or not safetensors
        raise weights_error("training state", tensor_path, exc) from None
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": payload["optimizer_groups"]})
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict({**payload["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    torch.set_rng_state(tensors["rng/torch"])
    if numpy_rng is not None and payload.get("numpy_rng") is not None:
        numpy_rng.bit_generator.state = payload["numpy_rng"]
    if python_rng is not None and payload.get("python_rng") is not None:
        python_rng.setstate(_tupled(payload["python_rng"]))
    model = {key[len("model/"):]: value for key, value in tensors.items() if key.startswith("model/")}
    return ResumedState(step=int(payload["step"]), model=model, extra=dict(payload.get("extra") or {}))
