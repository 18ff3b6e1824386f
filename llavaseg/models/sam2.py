"""A frozen SAM 2.1 (transformers' ``Sam2Model``) behind the same interface as :class:`FrozenSAM`.

Why transformers' classes rather than the ``sam2`` package: transformers is already a dependency, its SAM 2
is plain PyTorch (the ``sam2`` package builds a CUDA extension and pulls in Hydra), and its checkpoints are
safetensors folders loaded like the MLLM (``facebook/sam2.1-hiera-{tiny,small,base-plus,large}``).

SAM 2's Hiera encoder is hierarchical, so the multi-scale features the adapters read come natively: the
feature pyramid's two high-resolution maps (strides 4 and 8, projected as the mask decoder projects them)
are the ``levels``, and the stride-16 map (plus SAM 2's "no memory" embedding, as in image mode) is the
``embedding``. Images are resized to the model's square input as ``Sam2ImageProcessor`` does (no aspect
preservation), and masks come back to the original size by bilinear interpolation, as its
``post_process_masks`` does.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from llavaseg.errors import CheckpointMismatchError, InputError, UnsupportedError
from llavaseg.images import image_digest
from llavaseg.models.common import freeze, weights_error
from llavaseg.models.sam import FeatureMemo, SamImageFeatures

__all__ = ["FrozenSAM2", "tiny_sam2_config", "SAM2_CHECKPOINTS"]

SAM2_CHECKPOINTS = {
    "sam2.1-hiera-tiny": "facebook/sam2.1-hiera-tiny",
    "sam2.1-hiera-small": "facebook/sam2.1-hiera-small",
    "sam2.1-hiera-base-plus": "facebook/sam2.1-hiera-base-plus",
    "sam2.1-hiera-large": "facebook/sam2.1-hiera-large",
}
"""The published SAM 2.1 checkpoints in transformers' layout (config.json + model.safetensors)."""


def tiny_sam2_config(image_size: int = 128) -> Any:
    """A small ``Sam2Config`` of the real architecture (Hiera with 4 stages, FPN, two-way decoder): for tests
    and plumbing. Embedding grid ``image_size / 16``; levels at strides 4 and 8. Weights are drawn with a
    larger spread than transformers' default (0.02, meant for large models): at 32 channels that default gives
    mask logits of ~1e-5, so nothing downstream could learn from such a random model."""
    from transformers import Sam2Config

    size = image_size
    return Sam2Config(
        vision_config=dict(
            backbone_config=dict(model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1,
                                 image_size=[size, size], blocks_per_stage=[1, 1, 2, 1],
                                 embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 1, 2, 2],
                                 window_size_per_stage=[4, 4, 4, 4], global_attention_blocks=[3],
                                 window_positional_embedding_background_size=[2, 2]),
            backbone_channel_list=[128, 64, 32, 16],
            backbone_feature_sizes=[[size // 4, size // 4], [size // 8, size // 8], [size // 16, size // 16]],
            fpn_hidden_size=32),
        prompt_encoder_config=dict(hidden_size=32, image_size=size, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
        initializer_range=0.2,
    )


def _processor_for(model: Any) -> Any:
    """SAM 2's image processor for ``model``'s input size (ImageNet normalisation, square resize)."""
    from transformers import Sam2ImageProcessor

    size = int(model.config.prompt_encoder_config.image_size)
    return Sam2ImageProcessor(size={"height": size, "width": size})


class FrozenSAM2(FeatureMemo):
    """Frozen ``Sam2Model`` with cached per-image features and a decoder that accepts prompt embeddings."""

    family = "sam2"
    mask_threshold = 0.0

    def __init__(self, model: torch.nn.Module, processor: Any = None, *, name: str = "sam2",
                 cache_size: int = 32) -> None:
        self.model = freeze(model)
        self.processor = processor if processor is not None else _processor_for(model)
        self.name = name
        config = model.config
        self.image_size = int(config.prompt_encoder_config.image_size)
        self.grid = self.image_size // int(config.prompt_encoder_config.patch_size)
        hidden = int(config.mask_decoder_config.hidden_size)
        self.prompt_dim = hidden
        self.level_dims = (hidden // 8, hidden // 4)  # conv_s0 / conv_s1 outputs, strides 4 and 8
        self._cache: OrderedDict[str, SamImageFeatures] = OrderedDict()
        self.cache_size = cache_size
        self._fingerprint: str | None = None

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def random_tiny(cls, *, device: str = "cpu", seed: int = 0) -> FrozenSAM2:
        from transformers import Sam2Model

        torch.manual_seed(seed)
        return cls(Sam2Model(tiny_sam2_config()).to(device), name=f"sam2-tiny@random{seed}")

    @classmethod
    def from_pretrained(cls, source: str | Path, *, device: str = "cpu", local_files_only: bool = False
                        ) -> FrozenSAM2:
        """A transformers-format SAM 2 / 2.1 (hub id or ``save_pretrained`` folder)."""
        from transformers import Sam2Model

        path = Path(source)
        if path.is_file():
            raise CheckpointMismatchError(
                f"{source} is a file; SAM 2 loads from transformers' layout (a folder with config.json and "
                "model.safetensors, e.g. facebook/sam2.1-hiera-large); the sam2 package's .pt is not read")
        try:
            model = Sam2Model.from_pretrained(str(source), local_files_only=local_files_only)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedError(f"cannot load SAM 2 {source}: {first}") from None
        except Exception as exc:  # noqa: BLE001 - damaged/refused weights (SafetensorError, UnpicklingError...)
            raise weights_error("SAM 2 weights in", source, exc) from None
        processor = None
        if path.is_dir() and (path / "preprocessor_config.json").is_file():
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(str(path))
        name = path.name if path.is_dir() else str(source)
        return cls(model.to(device), processor, name=name)

    # ------------------------------------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def mask_decoder(self) -> torch.nn.Module:
        return self.model.mask_decoder

    def identity(self) -> dict[str, str]:
        """Family, architecture and a weight fingerprint: adapters trained for one segmenter are refused by any
        other (a SAM 1 identity has no ``family`` key, so the two never match)."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=8)
            for key, tensor in sorted(self.model.state_dict().items()):
                if key.startswith(("mask_decoder", "vision_encoder.neck")):
                    digest.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])
            self._fingerprint = digest.hexdigest()
        config = self.model.config.vision_config.backbone_config
        spec = f"hiera-{'-'.join(map(str, config.embed_dim_per_stage))}@{self.image_size}"
        return {"family": "sam2", "spec": spec, "weights": self._fingerprint}

    # -------------------------------------------------------------------------------------------- encoding
    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise InputError(f"SAM 2 expects HxWx3 uint8 RGB images, got {image.shape} {image.dtype}")
        inputs = self.processor(images=[Image.fromarray(image) for image in images], return_tensors="pt")
        return inputs["pixel_values"].to(self.device)

    @torch.no_grad()  # not inference_mode: cached features must be usable in autograd (adapter training)
    def encode_batch(self, images: list[np.ndarray]) -> list[SamImageFeatures]:
        keys = [image_digest(image) for image in images]
        order = [i for i, key in enumerate(keys) if key not in self._cache and keys.index(key) == i]
        if order:
            embeddings = self.model.get_image_embeddings(self.preprocess([images[i] for i in order]))
            for row, index in enumerate(order):
                self._remember(keys[index], SamImageFeatures(
                    embedding=embeddings[-1][row:row + 1].float().clone(),
                    levels=[level[row:row + 1].float().contiguous() for level in embeddings[:-1]],
                    input_size=(self.image_size, self.image_size),
                    original_size=(int(images[index].shape[0]), int(images[index].shape[1]))))
        return [self._cache[key] for key in keys]

    # -------------------------------------------------------------------------------------------- decoding
    def no_mask_dense(self, batch: int) -> torch.Tensor:
        weight = self.model.prompt_encoder.no_mask_embed.weight
        return weight.reshape(1, -1, 1, 1).expand(batch, -1, self.grid, self.grid)

    def decode(self, features: SamImageFeatures, sparse: torch.Tensor, dense: torch.Tensor | None = None,
               multimask_output: bool = False, decoder: torch.nn.Module | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode ``B`` prompt sets against ONE image (sparse ``B x N x C``, dense ``B x C x g x g`` or None):
        low-resolution logits ``B x M x 4g x 4g`` and IoU predictions ``B x M``. Each prompt set is its own
        batch row (SAM 2 adds the dense prompt before repeating per point batch, so a per-set dense prompt
        needs a row of its own). ``decoder`` replaces the frozen mask decoder (a trainable copy)."""
        decoder = decoder if decoder is not None else self.model.mask_decoder
        weight = decoder.iou_token.weight
        batch = sparse.shape[0]
        if dense is None:
            dense = self.no_mask_dense(batch)
        positional = self.model.get_image_wide_positional_embeddings().to(device=weight.device, dtype=weight.dtype)

        def rows(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device=weight.device, dtype=weight.dtype).expand(batch, -1, -1, -1)

        low, iou, _, _ = decoder(
            image_embeddings=rows(features.embedding), image_positional_embeddings=rows(positional),
            sparse_prompt_embeddings=sparse.to(device=weight.device, dtype=weight.dtype)[:, None],
            dense_prompt_embeddings=dense.to(device=weight.device, dtype=weight.dtype),
            multimask_output=multimask_output, high_resolution_features=[rows(level) for level in features.levels])
        return low[:, 0], iou[:, 0]

    def upscale(self, low_res: torch.Tensor, features: SamImageFeatures,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        """Mask logits at the original image size (or ``size``), as ``Sam2ImageProcessor.post_process_masks``."""
        return F.interpolate(low_res, size or features.original_size, mode="bilinear", align_corners=False)

    def _scaled(self, coords: np.ndarray, original_size: tuple[int, int]) -> torch.Tensor:
        height, width = original_size
        scaled = np.asarray(coords, dtype=np.float32).copy()
        scaled[..., 0] *= self.image_size / width
        scaled[..., 1] *= self.image_size / height
        return torch.as_tensor(scaled, device=self.device)

    def _predict(self, features: SamImageFeatures, sparse: torch.Tensor, dense: torch.Tensor,
                 multimask_output: bool) -> tuple[np.ndarray, np.ndarray]:
        low, iou = self.decode(features, sparse[0], dense[:1].expand(sparse.shape[1], -1, -1, -1), multimask_output)
        return (self.upscale(low, features) > self.mask_threshold).cpu().numpy(), iou.float().cpu().numpy()

    @torch.no_grad()  # not inference_mode: the features it caches may later be used in autograd
    def predict_boxes(self, image: np.ndarray, boxes: np.ndarray, multimask_output: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Masks for XYXY boxes in original-image pixels."""
        features = self.encode(image)
        boxes_t = self._scaled(np.asarray(boxes, dtype=np.float32).reshape(-1, 2, 2), features.original_size)
        sparse, dense = self.model.prompt_encoder(input_points=None, input_labels=None,
                                                  input_boxes=boxes_t.reshape(1, -1, 4), input_masks=None)
        return self._predict(features, sparse, dense, multimask_output)

    @torch.no_grad()
    def predict_points(self, image: np.ndarray, points: np.ndarray, labels: np.ndarray,
                       multimask_output: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Masks for point prompts: ``points`` B x N x 2 (x, y) in original pixels, ``labels`` B x N."""
        features = self.encode(image)
        coords = self._scaled(points, features.original_size)[None]
        labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int, device=self.device)[None]
        sparse, dense = self.model.prompt_encoder(input_points=coords, input_labels=labels_t, input_boxes=None,
                                                  input_masks=None)
        return self._predict(features, sparse, dense, multimask_output)
