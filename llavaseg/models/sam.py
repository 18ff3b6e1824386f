"""A frozen Segment-Anything model driven below ``SamPredictor``.

The LLaVASeg route needs what the predictor hides: the image encoder's intermediate (multi-scale) features,
and a mask decoder fed with prompt embeddings that come from adapters rather than from points or boxes. This
wrapper does the predictor's preprocessing exactly (``ResizeLongestSide`` + ``Sam.preprocess``), encodes each
image once, and decodes any number of prompt sets against the cached features.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from llavaseg.atomic import atomic_write
from llavaseg.errors import CheckpointMismatchError, InputError
from llavaseg.images import image_digest
from llavaseg.models.common import (
    WEIGHT_FILE_ERRORS,
    freeze,
    state_dict_mismatch,
    weights_error,
)
from llavaseg.models.sam_spec import (
    SAM_SPECS,
    SamSpec,
    build_sam_from_spec,
    infer_sam_spec,
)


@dataclass
class SamImageFeatures:
    """Everything the decoder and the adapters need about one image, computed once.

    ``embedding`` is the encoder output (1 x C x g x g). ``levels`` are the outputs of the encoder blocks named
    by ``FrozenSAM.feature_layers`` (1 x D x g x g each, channels first): the adapters' multi-scale inputs.
    """

    embedding: torch.Tensor
    levels: list[torch.Tensor]
    input_size: tuple[int, int]
    original_size: tuple[int, int]

    def to(self, device: torch.device | str) -> SamImageFeatures:
        return SamImageFeatures(self.embedding.to(device), [level.to(device) for level in self.levels],
                                self.input_size, self.original_size)


FEATURES_FORMAT = "llavaseg-sam-features-v1"


def save_sam_features(path: str | Path, features: SamImageFeatures) -> None:
    """Write one image's features as safetensors (``embedding``, ``level_<i>``), atomically.

    The one on-disk form of SAM features: the encoder's disk cache and the training feature cache both use it.
    Metadata is a single JSON key, so the header (and the file) is byte-identical for identical features.
    """
    from safetensors.torch import save_file

    tensors = {"embedding": features.embedding.detach().cpu().contiguous()}
    tensors.update({f"level_{i}": level.detach().cpu().contiguous() for i, level in enumerate(features.levels)})
    meta = {"llavaseg": json.dumps({"format": FEATURES_FORMAT, "input_size": list(features.input_size),
                                    "original_size": list(features.original_size),
                                    "num_levels": len(features.levels)}, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_sam_features(path: str | Path, device: str = "cpu") -> SamImageFeatures:
    """Read features written by :func:`save_sam_features`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=device) as handle:
        meta = json.loads(handle.metadata()["llavaseg"])
        if meta.get("format") != FEATURES_FORMAT:
            raise CheckpointMismatchError(f"{path}: not a llavaseg SAM feature file ({meta.get('format')})")
        embedding = handle.get_tensor("embedding")
        levels = [handle.get_tensor(f"level_{i}") for i in range(int(meta["num_levels"]))]
    return SamImageFeatures(embedding, levels, tuple(meta["input_size"]), tuple(meta["original_size"]))


def read_sam_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an upstream ``.pth`` (``torch.load(weights_only=True)``, memory-mapped) or a
    ``.safetensors`` file; a ``{"model": state}`` wrapper is unwrapped. No pickle ever runs code."""
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointMismatchError(f"SAM checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except WEIGHT_FILE_ERRORS as exc:  # unreadable / truncated / refused pickled objects
        raise weights_error("SAM checkpoint", path, exc) from None
    if isinstance(state, dict) and set(state) <= {"model", "state_dict"} and len(state) == 1:
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"SAM checkpoint {path} does not hold a state dict of tensors")
    return state


def load_sam_checkpoint(sam: Sam, checkpoint: str | Path, spec: SamSpec,
                        state: dict[str, torch.Tensor] | None = None) -> None:
    """Load a checkpoint (or its already-read ``state``) into ``sam``, refusing one of another model."""
    path = Path(checkpoint)
    state = state if state is not None else read_sam_state(path)
    expected = sam.state_dict()
    problem = state_dict_mismatch(expected, state)
    if problem:
        raise CheckpointMismatchError(f"SAM checkpoint {path} is not a {spec.name} checkpoint: {problem}")
    sam.load_state_dict(state)


class FeatureMemo:
    """The per-image feature memo every frozen segmenter keeps: pixel digest -> features, the least recently
    used dropped beyond ``cache_size`` (a subclass fills ``_cache`` in its ``encode_batch``)."""

    _cache: OrderedDict[str, SamImageFeatures]
    cache_size: int

    def encode_batch(self, images: list[np.ndarray]) -> list[SamImageFeatures]:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, image: np.ndarray) -> SamImageFeatures:
        return self.encode_batch([image])[0]

    def _remember(self, key: str, features: SamImageFeatures) -> None:
        self._cache[key] = features
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        self._cache.clear()


class FrozenSAM(FeatureMemo):
    """Frozen ``Sam`` with cached per-image features and a decoder that accepts prompt embeddings."""

    family = "sam"

    def __init__(self, sam: Sam, spec: SamSpec, *, name: str | None = None,
                 feature_layers: tuple[int, ...] | None = None, cache_size: int = 32,
                 disk_cache: str | Path | None = None, half_encoder: bool | None = None) -> None:
        self.sam = freeze(sam)
        # On GPU the image encoder (nearly all of SAM's compute) runs in fp16 unless told otherwise; on CPU
        # fp16 is slower, so it stays fp32. The decoder always runs in the model's own dtype.
        if half_encoder is None:
            half_encoder = self.sam.device.type == "cuda"
        self.half_encoder = half_encoder
        if half_encoder:
            self.sam.image_encoder.half()
        self.disk_cache = Path(disk_cache) if disk_cache is not None else None
        self.spec = spec
        self.name = name or spec.name
        self.feature_layers = tuple(feature_layers if feature_layers is not None else spec.encoder_global_attn_indexes)
        self.transform = ResizeLongestSide(spec.image_size)
        self._cache: OrderedDict[str, SamImageFeatures] = OrderedDict()
        self.cache_size = cache_size
        self._fingerprint: str | None = None

    @classmethod
    def create(cls, model_type: str | SamSpec, checkpoint: str | Path | None = None, *, device: str = "cpu",
               seed: int = 0, cache_size: int = 32, disk_cache: str | Path | None = None,
               half_encoder: bool | None = None) -> FrozenSAM:
        """Build a registry model (``vit_b``/``vit_l``/``vit_h``/``tiny``/``tiny-world``) and load ``checkpoint``.

        Without a checkpoint the weights are random (seeded): useful for plumbing and timing only.
        """
        if isinstance(model_type, SamSpec):
            spec = model_type
        elif model_type in SAM_SPECS:
            spec = SAM_SPECS[model_type]
        else:
            raise CheckpointMismatchError(f"unknown SAM model type {model_type!r}; known: {sorted(SAM_SPECS)}")
        torch.manual_seed(seed)
        sam = build_sam_from_spec(spec)
        if checkpoint is not None:
            load_sam_checkpoint(sam, checkpoint, spec)
        name = spec.name + (f"@{Path(checkpoint).name}" if checkpoint is not None else f"@random{seed}")
        return cls(sam.to(device), spec, name=name, cache_size=cache_size, disk_cache=disk_cache,
                   half_encoder=half_encoder)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, device: str = "cpu", cache_size: int = 32,
                        disk_cache: str | Path | None = None, half_encoder: bool | None = None) -> FrozenSAM:
        """Load a segment_anything checkpoint whose architecture (ViT-B/L/H or a tiny spec) is read from its
        tensors: no model type to pass, and a checkpoint never meets a randomly built model of another size."""
        state = read_sam_state(checkpoint)
        try:
            spec = infer_sam_spec({key: tuple(value.shape) for key, value in state.items()}, where=str(checkpoint))
        except ValueError as exc:
            raise CheckpointMismatchError(str(exc)) from None
        sam = build_sam_from_spec(spec)
        load_sam_checkpoint(sam, checkpoint, spec, state)
        return cls(sam.to(device), spec, name=f"{spec.name}@{Path(checkpoint).name}", cache_size=cache_size,
                   disk_cache=disk_cache, half_encoder=half_encoder)

    # ------------------------------------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        return self.sam.device

    @property
    def prompt_dim(self) -> int:
        return self.spec.prompt_embed_dim

    @property
    def level_dim(self) -> int:
        return self.spec.encoder_embed_dim

    @property
    def level_dims(self) -> tuple[int, ...]:
        """Channels of each multi-scale level the adapters read (the ViT blocks named by ``feature_layers``)."""
        return (self.spec.encoder_embed_dim,) * len(self.feature_layers)

    @property
    def grid(self) -> int:
        """Side of the image embedding (64 for the published models)."""
        return self.spec.embedding_size

    @property
    def mask_threshold(self) -> float:
        return float(self.sam.mask_threshold)

    @property
    def mask_decoder(self) -> torch.nn.Module:
        """The frozen mask decoder (the ``[SEG]`` route trains a copy of it)."""
        return self.sam.mask_decoder

    def identity(self) -> dict[str, str]:
        """Architecture and a weight fingerprint: adapters trained for one SAM are refused by another."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=8)
            for key, tensor in sorted(self.sam.state_dict().items()):
                if key.startswith("mask_decoder") or key.startswith("image_encoder.neck"):
                    digest.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])
            self._fingerprint = digest.hexdigest()
        return {"spec": self.spec.name, "weights": self._fingerprint}

    # ------------------------------------------------------------------------------------------- encoding
    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Resize longest side (as ``SamPredictor.set_image``), normalise and pad: 1 x 3 x S x S."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"SAM expects an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
        resized = self.transform.apply_image(image)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        return self.sam.preprocess(tensor.float()), (int(resized.shape[0]), int(resized.shape[1]))

    @torch.no_grad()  # not inference_mode: cached features must be usable in autograd (adapter training)
    def encode_batch(self, images: list[np.ndarray]) -> list[SamImageFeatures]:
        """Encode images not yet cached in one encoder batch; return features for all, in order."""
        keys = [image_digest(image) for image in images]
        for key in dict.fromkeys(keys):
            if key not in self._cache and (loaded := self._load_from_disk(key)) is not None:
                self._remember(key, loaded)
        order = list(dict.fromkeys(i for i, key in enumerate(keys) if key not in self._cache
                                   and keys.index(key) == i))
        if order:
            prepared = [self.preprocess(images[i]) for i in order]
            batch = torch.cat([tensor for tensor, _ in prepared])
            encoder_dtype = self.sam.image_encoder.patch_embed.proj.weight.dtype
            captured: dict[int, torch.Tensor] = {}
            hooks = [self.sam.image_encoder.blocks[layer].register_forward_hook(
                lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out))
                for layer in self.feature_layers]
            try:
                embedding = self.sam.image_encoder(batch.to(encoder_dtype)).float()
            finally:
                for hook in hooks:
                    hook.remove()
            for row, index in enumerate(order):
                features = SamImageFeatures(
                    embedding=embedding[row:row + 1].clone(),
                    levels=[captured[layer][row:row + 1].permute(0, 3, 1, 2).float().contiguous()
                            for layer in self.feature_layers],
                    input_size=prepared[row][1],
                    original_size=(int(images[index].shape[0]), int(images[index].shape[1])),
                )
                self._remember(keys[index], features)
                self._save_to_disk(keys[index], features)
        return [self._cache[key] for key in keys]

    def _disk_path(self, key: str) -> Path | None:
        if self.disk_cache is None:
            return None
        identity = self.identity()
        folder = self.disk_cache / f"{identity['spec']}-{identity['weights']}-{'-'.join(map(str, self.feature_layers))}"
        return folder / f"{key}.safetensors"

    def _load_from_disk(self, key: str) -> SamImageFeatures | None:
        path = self._disk_path(key)
        if path is None or not path.is_file():
            return None
        return load_sam_features(path, device=str(self.device))

    def _save_to_disk(self, key: str, features: SamImageFeatures) -> None:
        path = self._disk_path(key)
        if path is not None:
            save_sam_features(path, features)

    # ------------------------------------------------------------------------------------------- decoding
    def no_mask_dense(self, batch: int) -> torch.Tensor:
        """SAM's 'no mask' dense prompt broadcast over the embedding grid (what the prompt encoder emits)."""
        grid = self.spec.embedding_size
        return self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, grid, grid)

    def decode(self, features: SamImageFeatures, sparse: torch.Tensor, dense: torch.Tensor | None = None,
               multimask_output: bool = False, decoder: torch.nn.Module | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode ``B`` prompt sets against ONE image: sparse ``B x N x C``, dense ``B x C x g x g`` or None.

        Returns low-resolution mask logits ``B x M x 4g x 4g`` and IoU predictions ``B x M`` (M = 1, or 3 with
        ``multimask_output``). Gradients flow through the frozen decoder into the prompts (for adapter training).
        ``decoder`` replaces the frozen mask decoder (the ``[SEG]`` route's trainable copy); inputs then move to
        its device and dtype.
        """
        decoder = decoder if decoder is not None else self.sam.mask_decoder
        weight = decoder.iou_token.weight
        batch = sparse.shape[0]
        if dense is None:
            dense = self.no_mask_dense(batch)
        return decoder(
            image_embeddings=features.embedding.to(device=weight.device, dtype=weight.dtype),
            image_pe=self.sam.prompt_encoder.get_dense_pe().to(device=weight.device, dtype=weight.dtype),
            sparse_prompt_embeddings=sparse.to(device=weight.device, dtype=weight.dtype),
            dense_prompt_embeddings=dense.to(device=weight.device, dtype=weight.dtype),
            multimask_output=multimask_output,
        )

    def upscale(self, low_res: torch.Tensor, features: SamImageFeatures,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        """Mask logits at the original image size (or ``size``), ``B x M x H x W``, as ``Sam.postprocess_masks``."""
        return self.sam.postprocess_masks(low_res, features.input_size, size or features.original_size)

    @torch.no_grad()  # not inference_mode: the features it caches may later be used in autograd
    def predict_boxes(self, image: np.ndarray, boxes: np.ndarray, multimask_output: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Masks for XYXY boxes in original-image pixels (the promptable-segmenter path, e.g. oracle boxes)."""
        features = self.encode(image)
        boxes_t = torch.as_tensor(self.transform.apply_boxes(np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                                                             features.original_size), device=self.device)
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes_t, masks=None)
        low, iou = self.decode(features, sparse, dense, multimask_output)
        return (self.upscale(low, features) > self.sam.mask_threshold).cpu().numpy(), iou.cpu().numpy()

    @torch.no_grad()
    def predict_points(self, image: np.ndarray, points: np.ndarray, labels: np.ndarray,
                       multimask_output: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Masks for point prompts: ``points`` B x N x 2 (x, y) in original pixels, ``labels`` B x N."""
        features = self.encode(image)
        coords = self.transform.apply_coords(np.asarray(points, dtype=np.float32), features.original_size)
        coords_t = torch.as_tensor(coords, device=self.device)
        labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int, device=self.device)
        sparse, dense = self.sam.prompt_encoder(points=(coords_t, labels_t), boxes=None, masks=None)
        low, iou = self.decode(features, sparse, dense, multimask_output)
        return (self.upscale(low, features) > self.sam.mask_threshold).cpu().numpy(), iou.cpu().numpy()
