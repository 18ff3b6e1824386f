"""Explicit architecture specs for Segment-Anything models, and a builder over segment_anything's classes.

Upstream ``build_sam.py`` hard-codes ``image_size=1024``, ``patch_size=16`` and ``prompt_embed_dim=256``, so it
can only build the three published variants. The same ``Sam``/``ImageEncoderViT``/``PromptEncoder``/
``MaskDecoder`` classes build a small model just as well when those numbers are parameters; the specs below
make them explicit (open_clip-style: a registry of named, plain-data configs). The specs are plain data (this
module imports neither torch nor segment_anything until a model is built), so sources can be checked cheaply.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    from segment_anything.modeling import Sam


class SamSpec(BaseModel):
    """Every number needed to build a ``segment_anything.modeling.Sam``; equal specs give compatible weights."""

    model_config = ConfigDict(frozen=True)

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    decoder_depth: int = 2
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16

    @property
    def embedding_size(self) -> int:
        """Side of the square image-embedding grid (64 for the published models)."""
        return self.image_size // self.patch_size


SAM_SPECS: dict[str, SamSpec] = {
    "vit_h": SamSpec(
        name="vit_h", encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
    "vit_l": SamSpec(
        name="vit_l", encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_b": SamSpec(
        name="vit_b", encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
        encoder_global_attn_indexes=(2, 5, 8, 11),
    ),
    # Small models of the same classes, for offline tests and the embedded tiny world (128 px scenes).
    "tiny": SamSpec(
        name="tiny", encoder_embed_dim=64, encoder_depth=4, encoder_num_heads=2,
        encoder_global_attn_indexes=(1, 3), image_size=128, patch_size=8, window_size=4,
        prompt_embed_dim=64, decoder_mlp_dim=128, decoder_num_heads=4, iou_head_hidden_dim=64,
        mask_in_chans=8,
    ),
    "tiny-world": SamSpec(
        name="tiny-world", encoder_embed_dim=96, encoder_depth=4, encoder_num_heads=3,
        encoder_global_attn_indexes=(1, 3), image_size=128, patch_size=8, window_size=4,
        prompt_embed_dim=64, decoder_mlp_dim=256, decoder_num_heads=4, iou_head_hidden_dim=64,
        mask_in_chans=8,
    ),
}


def build_sam_from_spec(spec: SamSpec) -> Sam:
    """Build an (untrained) ``Sam`` with segment_anything's own modules, following upstream ``_build_sam``."""
    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    grid = spec.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.encoder_depth,
            embed_dim=spec.encoder_embed_dim,
            img_size=spec.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(spec.encoder_global_attn_indexes),
            window_size=spec.window_size,
            out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(spec.image_size, spec.image_size),
            mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=spec.decoder_depth,
                embedding_dim=spec.prompt_embed_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_num_heads,
            ),
            transformer_dim=spec.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


# ---------------------------------------------------------------------------------- from a checkpoint's tensors
def _count(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    return len({key[len(prefix):].split(".", 1)[0] for key in shapes if key.startswith(prefix)})


def spec_fields_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, object]:
    """Every :class:`SamSpec` number that a segment_anything state dict's tensor shapes determine.

    (Only the decoder's number of attention heads is invisible in the shapes; it is taken from the matching
    known spec.) Raises ``KeyError`` when a tensor of segment_anything's layout is missing.
    """
    embed, _, patch, _ = shapes["image_encoder.patch_embed.proj.weight"]
    grid = shapes["image_encoder.pos_embed"][1]
    depth = _count(shapes, "image_encoder.blocks.")
    rel = [shapes[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in range(depth)]
    global_blocks = tuple(i for i, shape in enumerate(rel) if shape[0] == 2 * grid - 1)
    windowed = [shape[0] for i, shape in enumerate(rel) if i not in global_blocks]
    return {
        "encoder_embed_dim": embed, "encoder_depth": depth, "encoder_num_heads": embed // rel[0][1],
        "encoder_global_attn_indexes": global_blocks, "image_size": grid * patch, "patch_size": patch,
        "window_size": (windowed[0] + 1) // 2 if windowed else 14,
        "prompt_embed_dim": shapes["image_encoder.neck.0.weight"][0],
        "decoder_mlp_dim": shapes["mask_decoder.transformer.layers.0.mlp.lin1.weight"][0],
        "decoder_depth": _count(shapes, "mask_decoder.transformer.layers."),
        "iou_head_hidden_dim": shapes["mask_decoder.iou_prediction_head.layers.0.weight"][0],
        "mask_in_chans": shapes["prompt_encoder.mask_downscaling.3.weight"][0],
    }


def infer_sam_spec(shapes: dict[str, tuple[int, ...]], where: str = "checkpoint") -> SamSpec:
    """The registered spec whose architecture these tensors have (``vit_b``/``vit_l``/``vit_h``, the tiny ones).

    Raises ``ValueError`` naming the architecture when the tensors are not segment_anything's layout or match
    no registered spec (a new variant needs its :class:`SamSpec` added, heads included).
    """
    try:
        fields = spec_fields_from_shapes(shapes)
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"{where} does not hold a segment_anything SAM state dict (e.g. no "
                         "image_encoder.patch_embed.proj.weight)") from None
    for spec in SAM_SPECS.values():
        if all(getattr(spec, name) == value for name, value in fields.items()):
            return spec
    raise ValueError(f"{where} is a SAM of an unregistered architecture (encoder width {fields['encoder_embed_dim']}, "
                     f"depth {fields['encoder_depth']}, {fields['image_size']} px); add its SamSpec to SAM_SPECS")
