"""Helpers every frozen-model wrapper shares: freezing, and what ``dtype="auto"`` means on a device."""

from __future__ import annotations

import torch

from llavaseg.errors import InputError

__all__ = ["freeze", "resolve_dtype", "DTYPES"]

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
