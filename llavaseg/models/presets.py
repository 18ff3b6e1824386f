"""Named presets: a :class:`~llavaseg.models.components.ComponentSpec` with a name, a description and a notice.

Like open_clip's model registry, a preset is plain data (importing this module loads no model and no torch);
:func:`~llavaseg.models.components.build_components` turns it into models.

* ``tiny``: random weights of the real classes, for plumbing and tests; its masks are noise (random parts are
  allowed without asking).
* ``tiny-world``: small models pretrained on the generated tiny world and shipped with the package, plus
  trained adapters and a ``[SEG]`` model: the method working offline. A toy: it knows coloured shapes only.
* the real presets name published weights users must have (a hub id, a SAM file name looked up in the
  weights folders, an open_clip tag); they ship no adapters and no ``[SEG]`` model, so the routes that need
  those refuse until they are trained (or ``--allow-untrained`` is passed for a plumbing run).
"""

from __future__ import annotations

from pydantic import ConfigDict

from llavaseg.errors import InputError
from llavaseg.models.components import ComponentSpec
from llavaseg.tinyworld.vocab import ATTRIBUTE_VALUES

__all__ = ["Preset", "PRESETS", "TOY_NOTICE", "list_presets", "get_preset"]

TOY_NOTICE = ("tiny-world preset: small models trained on synthetic coloured shapes; masks and answers on real "
              "photographs are meaningless")


class Preset(ComponentSpec):
    """A named component spec. ``plumbing`` presets may use random parts without ``allow_untrained``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str
    plumbing: bool = False
    notice: str | None = None
    # Route options tuned for this preset's models and data (chosen on its train split, never on val); options a
    # caller passes win. Why per preset: e.g. the training-free route's point lattice suits the object sizes.
    route_defaults: dict[str, dict[str, object]] = {}

    def spec(self) -> ComponentSpec:
        return ComponentSpec(**{name: getattr(self, name) for name in ComponentSpec.model_fields})


_REAL_ADAPTERS = {"adapter_dim": 256, "adapter_heads": 8, "adapter_scales": (8, 4, 2, 2, 1)}
# SAM 2's two pyramid levels (strides 4 and 8) are read at 1/4 and 1/2 of the 64 x 64 embedding grid, then the
# embedding itself: the same token counts per level as SAM 1's coarsest three.
_SAM2_ADAPTERS = {"adapter_dim": 256, "adapter_heads": 8, "adapter_scales": (4, 2, 1)}

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny", mllm="random:tiny", sam="random:tiny", clip="random:tiny-clip", adapter_dim=64,
        plumbing=True, description="random small models of the real classes; runs offline in seconds; outputs are noise"),
    "tiny-world": Preset(
        name="tiny-world", mllm="pkg:weights/tinyworld/mllm", sam="pkg:weights/tinyworld/sam_tiny_world.safetensors",
        clip="local-dir:pkg:weights/tinyworld/clip", adapters="pkg-adapters:tiny-world", adapter_dim=64,
        seg_token="pkg:weights/tinyworld/seg_token", seg_token_cot="pkg:weights/tinyworld/seg_token_cot",
        notice=TOY_NOTICE, route_defaults={
            "training-free": {"grid": 6},
            # the values the tiny MLLM may name: llavaseg-verify constrains its stage-2 answers to them
            "llavaseg-verify": {"attribute_schema": {key: list(values) for key, values in ATTRIBUTE_VALUES.items()}},
        },
        description="small models pretrained on the procedurally generated tiny world, frozen, plus trained adapters"),
    "llava-1.5-7b": Preset(
        name="llava-1.5-7b", mllm="llava-hf/llava-1.5-7b-hf", sam="sam_vit_h_4b8939.pth", clip="ViT-L-14:openai",
        **_REAL_ADAPTERS,
        description="LLaVA-1.5-7B + SAM ViT-H + CLIP ViT-L/14 (openai); weights must be available locally"),
    "llava-1.5-13b": Preset(
        name="llava-1.5-13b", mllm="llava-hf/llava-1.5-13b-hf", sam="sam_vit_h_4b8939.pth", clip="ViT-L-14:openai",
        **_REAL_ADAPTERS,
        description="LLaVA-1.5-13B + SAM ViT-H + CLIP ViT-L/14 (openai); weights must be available locally"),
    "qwen2.5-vl-7b": Preset(
        name="qwen2.5-vl-7b", mllm="Qwen/Qwen2.5-VL-7B-Instruct", sam="sam_vit_h_4b8939.pth",
        clip="ViT-L-14:openai", **_REAL_ADAPTERS,
        description="Qwen2.5-VL-7B-Instruct + SAM ViT-H + CLIP ViT-L/14 (openai); weights must be available locally"),
    "qwen2.5-vl-7b-sam2.1": Preset(
        name="qwen2.5-vl-7b-sam2.1", mllm="Qwen/Qwen2.5-VL-7B-Instruct", sam="facebook/sam2.1-hiera-large",
        clip="ViT-L-14:openai", **_SAM2_ADAPTERS,
        description="Qwen2.5-VL-7B-Instruct + SAM 2.1 hiera-large + CLIP ViT-L/14 (openai); weights must be "
                    "available locally"),
    "qwen3-vl-8b-sam2.1": Preset(
        name="qwen3-vl-8b-sam2.1", mllm="Qwen/Qwen3-VL-8B-Instruct", sam="facebook/sam2.1-hiera-large",
        clip="ViT-L-14:openai", **_SAM2_ADAPTERS,
        description="Qwen3-VL-8B-Instruct + SAM 2.1 hiera-large + CLIP ViT-L/14 (openai); weights must be "
                    "available locally"),
}


def list_presets() -> dict[str, str]:
    return {name: preset.description for name, preset in PRESETS.items()}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]
