"""Helpers every frozen-model wrapper shares: freezing, what ``dtype="auto"`` means on a device, and how a
weights file that cannot be read is reported."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from llavaseg.errors import CheckpointMismatchError, InputError

__all__ = ["freeze", "resolve_dtype", "DTYPES", "state_dict_mismatch", "WEIGHT_FILE_ERRORS", "weights_error",
           "autocast_for"]

WEIGHT_FILE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError)
"""What reading a damaged, truncated or refused weights file raises, from safetensors, torch.load or the
transformers/open_clip loaders built on them."""


def weights_error(what: str, path: str | Path, exc: BaseException) -> CheckpointMismatchError:
    """One line for a weights file that cannot be read: truncated safetensors and pickles holding more than
    tensors (refused by ``torch.load(weights_only=True)``) get a plain explanation instead of the library's."""
    if isinstance(exc, pickle.UnpicklingError):
        reason = ("a pickle holding objects other than tensors, refused unread (torch.load weights_only=True); "
                  "convert it to .safetensors")
    elif isinstance(exc, SafetensorError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"not a complete .safetensors file ({first})" if first else "not a complete .safetensors file"
    else:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__
    return CheckpointMismatchError(f"cannot read {what} {path}: {reason}")

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Turn off gradients for every parameter and switch to eval mode (dropout off)."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module.eval()


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """``"auto"``/None picks float32 on CPU (bf16 matmuls are slow there) and bfloat16 on accelerators."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``given`` cannot be loaded where ``expected`` is (missing, unexpected, mis-shaped tensors), or None."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    if not (missing or unexpected or wrong):
        return None
    detail = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped tensors"
    if wrong:
        return detail + (f" (e.g. {wrong[0]}: checkpoint {tuple(given[wrong[0]].shape)} vs "
                         f"model {tuple(expected[wrong[0]].shape)})")
    return detail + f" (e.g. {(missing or unexpected)[0]})"


def autocast_for(device: torch.device | str) -> Any:
    """Mixed precision where it pays: bf16 autocast on CUDA (fp16 where bf16 is unsupported), nothing on CPU
    (bf16 matmuls are slow there, and CPU results stay bit-identical to the recorded ones)."""
    import contextlib

    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)
