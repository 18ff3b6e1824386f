"""Helpers every frozen-model wrapper shares: freezing, and what ``dtype="auto"`` means on a device."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llavaseg.errors import InputError

__all__ = ["freeze", "resolve_dtype", "DTYPES", "state_dict_mismatch"]

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
