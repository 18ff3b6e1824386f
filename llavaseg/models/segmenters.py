"""The frozen promptable segmenters a route can drive, and what each must provide.

A segmenter kind is one entry of :data:`SEGMENTERS`: which ``--sam`` sources it claims, a cheap check of such a
source (no torch, no model load) and a builder. The object it builds satisfies :class:`FrozenSegmenter`, the
whole interface the routes, the feature cache, adapter training and the ``[SEG]`` model use; nothing else of a
segmenter is touched. Adding a third one (SAM 3's concept-prompted model, HQ-SAM, EfficientSAM) is one module
with a class like :class:`~llavaseg.models.sam2.FrozenSAM2` and one entry here; ``docs/segmenters.md`` spells out
the contract.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llavaseg.errors import InputError
from llavaseg.models.sources import HUB_ID, find_weights_file, parse_source, read_json

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from llavaseg.models.sam import SamImageFeatures

__all__ = ["FrozenSegmenter", "SegmenterKind", "SEGMENTERS", "SAM_SUFFIXES", "segmenter_kind", "check_segmenter",
           "build_segmenter"]

SAM_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_SAM2_ID = re.compile(r"sam2", re.IGNORECASE)


class FrozenSegmenter(Protocol):
    """What a frozen segmenter provides (``FrozenSAM``, ``FrozenSAM2``). Features are :class:`SamImageFeatures`:
    ``embedding`` 1 x prompt_dim x grid x grid, ``levels`` the multi-scale maps (1 x level_dims[i] x s x s with s
    a multiple of grid / scale for the adapters' scales), and the input/original sizes."""

    family: str  # "sam", "sam2": recorded in identities so adapters never meet another kind
    name: str

    @property
    def device(self) -> torch.device: ...
    @property
    def prompt_dim(self) -> int: ...
    @property
    def level_dims(self) -> tuple[int, ...]: ...
    @property
    def grid(self) -> int: ...
    @property
    def mask_threshold(self) -> float: ...
    @property
    def mask_decoder(self) -> torch.nn.Module: ...

    def identity(self) -> dict[str, str]: ...
    def encode_batch(self, images: list[np.ndarray]) -> list[SamImageFeatures]: ...
    def encode(self, image: np.ndarray) -> SamImageFeatures: ...
    def clear_cache(self) -> None: ...
    def no_mask_dense(self, batch: int) -> torch.Tensor: ...
    def decode(self, features: SamImageFeatures, sparse: torch.Tensor, dense: torch.Tensor | None = None,
               multimask_output: bool = False, decoder: torch.nn.Module | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def upscale(self, low_res: torch.Tensor, features: SamImageFeatures,
                size: tuple[int, int] | None = None) -> torch.Tensor: ...
    def predict_points(self, image: np.ndarray, points: np.ndarray, labels: np.ndarray,
                       multimask_output: bool = True) -> tuple[np.ndarray, np.ndarray]: ...
    def predict_boxes(self, image: np.ndarray, boxes: np.ndarray, multimask_output: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class SegmenterKind:
    """One kind of frozen segmenter: the sources it claims, a torch-free check, a builder."""

    name: str
    summary: str
    claims: Callable[[str], bool]
    check: Callable[[str], None]
    build: Callable[[str, str], Any]  # (source, device) -> FrozenSegmenter


# ------------------------------------------------------------------------------------------------ SAM (1)
def _check_sam(source: str) -> None:
    parsed = parse_source(source)
    if parsed.scheme == "random":
        from llavaseg.models.sam_spec import SAM_SPECS

        if parsed.value not in SAM_SPECS:
            raise InputError(f"unknown SAM architecture {parsed.value!r} in {source!r}; known: "
                             f"{sorted(SAM_SPECS) + ['sam2-tiny']}")
        return
    path = find_weights_file(source, "SAM checkpoint", "download it (e.g. sam_vit_h_4b8939.pth from "
                             "https://github.com/facebookresearch/segment-anything#model-checkpoints) and pass --sam PATH")
    if path.is_dir():
        config = read_json(path / "config.json")
        kind = config.get("model_type") if isinstance(config, dict) else None
        if kind == "sam":
            raise InputError(f"--sam {source} is a transformers SamModel folder; this library drives segment_anything's "
                             "classes for SAM 1: pass the segment_anything checkpoint (e.g. sam_vit_b_01ec64.pth)")
        raise InputError(f"--sam {source} is a folder, not a SAM checkpoint file ({'/'.join(SAM_SUFFIXES)}) nor a "
                         "transformers SAM 2 folder")
    if path.suffix.lower() not in SAM_SUFFIXES:
        raise InputError(f"--sam {source}: expected a checkpoint file ({', '.join(SAM_SUFFIXES)}), got {path.name}")


def _build_sam(source: str, device: str) -> Any:
    from llavaseg.models.sam import FrozenSAM

    parsed = parse_source(source)
    if parsed.scheme == "random":
        return FrozenSAM.create(parsed.value, None, device=device)
    return FrozenSAM.from_checkpoint(find_weights_file(source, "SAM checkpoint", "pass --sam PATH"), device=device)


# ------------------------------------------------------------------------------------------------- SAM 2
def _sam2_folder(source: str) -> Path | None:
    path = parse_source(source).path()
    if path is not None and path.is_dir():
        config = read_json(path / "config.json")
        if isinstance(config, dict) and config.get("model_type") == "sam2":
            return path
    return None


def _claims_sam2(source: str) -> bool:
    parsed = parse_source(source)
    if parsed.scheme == "random":
        return parsed.value == "sam2-tiny"
    if _sam2_folder(source) is not None:
        return True
    path = parsed.path()
    return (path is None or not path.exists()) and bool(HUB_ID.match(source)) and bool(_SAM2_ID.search(source))


def _check_sam2(source: str) -> None:
    from llavaseg.models.sources import in_hub_cache

    if parse_source(source).scheme == "random" or _sam2_folder(source) is not None:
        return
    import os

    if os.environ.get("HF_HUB_OFFLINE") == "1" and not in_hub_cache(source):
        raise InputError(f"--sam {source}: not a local SAM 2 folder and not in the Hugging Face cache "
                         "(HF_HUB_OFFLINE=1); download it or pass --sam DIR")


def _build_sam2(source: str, device: str) -> Any:
    from llavaseg.models.sam2 import FrozenSAM2

    parsed = parse_source(source)
    if parsed.scheme == "random":
        return FrozenSAM2.random_tiny(device=device)
    folder = _sam2_folder(source)
    return FrozenSAM2.from_pretrained(folder if folder is not None else source, device=device,
                                      local_files_only=folder is not None)


SEGMENTERS: dict[str, SegmenterKind] = {
    "sam2": SegmenterKind(
        name="sam2", summary="SAM 2 / 2.1 through transformers' Sam2Model: a hub id (facebook/sam2.1-hiera-large), "
                             "a save_pretrained folder, or random:sam2-tiny",
        claims=_claims_sam2, check=_check_sam2, build=_build_sam2),
    "sam": SegmenterKind(
        name="sam", summary="SAM 1 through segment_anything: a .pth/.safetensors checkpoint (ViT type read from its "
                            "tensors) or random:<spec>",
        claims=lambda source: True, check=_check_sam, build=_build_sam),
}
"""Kinds in the order they are asked to claim a source (SAM 1 takes whatever the others leave)."""


def segmenter_kind(source: str) -> SegmenterKind:
    return next(kind for kind in SEGMENTERS.values() if kind.claims(source))


def check_segmenter(source: str) -> None:
    segmenter_kind(source).check(source)


def build_segmenter(source: str, *, device: str) -> Any:
    return segmenter_kind(source).build(source, device)
