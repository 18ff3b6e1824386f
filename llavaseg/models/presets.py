"""Named presets: how to build each frozen model (and which adapters) for a ready-to-use Segmenter.

Like open_clip's model registry, a preset is plain data (:class:`Preset`); :func:`build_components` turns it
into models. ``tiny`` is random weights of the real classes (plumbing and tests: its masks are noise);
``tiny-world`` loads the small models pretrained by ``llavaseg.tinyworld`` and shipped with the package;
the real presets name published weights that users must have locally (no download happens here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from llavaseg.errors import InputError, UnsupportedError
from llavaseg.models.adapters import AdapterConfig, MultiScaleAdapters, load_adapters
from llavaseg.models.mllm import FrozenMLLM, Quantization
from llavaseg.models.sam import FrozenSAM
from llavaseg.models.sources import parse_source, resolve_path
from llavaseg.models.text_encoder import FrozenTextEncoder


class Preset(BaseModel):
    """Where each component comes from. Paths that start with ``pkg:`` are files shipped in the package."""

    model_config = ConfigDict(frozen=True)

    name: str
    description: str
    mllm: str  # HF id, local dir, "pkg:..." dir, or "random:tiny"
    sam_type: str
    sam_checkpoint: str | None = None
    clip_model: str = "tiny-clip"
    clip_pretrained: str | None = None
    adapters: str | None = None  # dir, "pkg:..." dir, or None (random init: meaningless masks)
    adapter_dim: int = 128
    adapter_heads: int = 4
    adapter_scales: tuple[int, ...] = (4, 2, 1)
    seg_token_model: str | None = None  # for route="seg-token": a trained <SEG> model dir


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny", mllm="random:tiny", sam_type="tiny", clip_model="tiny-clip", adapter_dim=64,
        description="random small models of the real classes; runs offline in seconds; outputs are noise"),
    "tiny-world": Preset(
        name="tiny-world", mllm="pkg:weights/tinyworld/mllm", sam_type="tiny-world",
        sam_checkpoint="pkg:weights/tinyworld/sam_tiny_world.safetensors",
        clip_model="local-dir:pkg:weights/tinyworld/clip", adapters="pkg-adapters:tiny-world", adapter_dim=64,
        seg_token_model="pkg:weights/tinyworld/seg_token",
        description="small models pretrained on the procedurally generated tiny world, frozen, plus trained adapters"),
    "llava-1.5-7b": Preset(
        name="llava-1.5-7b", mllm="llava-hf/llava-1.5-7b-hf", sam_type="vit_h",
        sam_checkpoint="sam_vit_h_4b8939.pth", clip_model="ViT-L-14", clip_pretrained="openai",
        adapter_dim=256, adapter_heads=8, adapter_scales=(8, 4, 2, 2, 1),
        description="LLaVA-1.5-7B + SAM ViT-H + CLIP ViT-L/14 (weights must be available locally)"),
    "llava-1.5-13b": Preset(
        name="llava-1.5-13b", mllm="llava-hf/llava-1.5-13b-hf", sam_type="vit_h",
        sam_checkpoint="sam_vit_h_4b8939.pth", clip_model="ViT-L-14", clip_pretrained="openai",
        adapter_dim=256, adapter_heads=8, adapter_scales=(8, 4, 2, 2, 1),
        description="LLaVA-1.5-13B + SAM ViT-H + CLIP ViT-L/14 (weights must be available locally)"),
}


def list_presets() -> dict[str, str]:
    return {name: preset.description for name, preset in PRESETS.items()}


def tiny_vocabulary() -> list[str]:
    """Words of the tiny world and of the shipped prompt templates (the random tiny MLLM's vocabulary)."""
    from llavaseg.prompting import PromptSet
    from llavaseg.tinyworld.vocab import VOCAB

    prompts = PromptSet.load()
    return [*VOCAB, *" ".join(t.text for t in prompts.templates.values()).replace("{", " ").replace("}", " ").split()]


def build_mllm(spec: str, *, device: str, dtype: str | None, quantization: Quantization, seed: int = 0) -> FrozenMLLM:
    source = parse_source(spec)
    if source.scheme == "random":
        from llavaseg.models.tiny_llava import build_tiny_llava

        if source.value != "tiny":
            raise InputError(f"unknown random MLLM {spec!r}; only 'random:tiny' exists")
        if quantization is not None:
            raise UnsupportedError("quantization needs a saved model; save the tiny model and load it from disk")
        model, processor = build_tiny_llava(tiny_vocabulary(), seed=seed)
        # A random model never emits end-of-sequence on purpose: cap its answers to keep plumbing fast.
        return FrozenMLLM(model.to(device), processor, name="random:tiny", max_new_tokens=12)
    path = source.path()
    if source.shipped and not path.is_dir():
        raise UnsupportedError(f"the shipped model {spec} is missing from this install ({path})")
    return FrozenMLLM.from_pretrained(source.resolved(), device=device, dtype=dtype, quantization=quantization,
                                      local_files_only=path.exists())


def build_text_encoder(model: str, pretrained: str | None, *, device: str) -> FrozenTextEncoder:
    return FrozenTextEncoder.create(parse_source(model).resolved(), pretrained, device=device)


def build_sam(sam_type: str, checkpoint: str | None, *, device: str) -> FrozenSAM:
    path = resolve_path(checkpoint) if checkpoint else None
    if path is not None and not path.is_file():
        raise InputError(f"SAM checkpoint {path} not found; download it or pass sam_checkpoint=PATH")
    return FrozenSAM.create(sam_type, path, device=device)


def new_adapters(sam: FrozenSAM, text_encoder: FrozenTextEncoder, *, dim: int, heads: int,
                 scales: tuple[int, ...], seed: int = 0) -> MultiScaleAdapters:
    """Randomly initialised adapters sized for ``sam`` and ``text_encoder`` (the start of training)."""
    import torch

    config = AdapterConfig(
        text_dim=text_encoder.dim, level_dim=sam.level_dim, prompt_dim=sam.prompt_dim,
        grid=sam.spec.embedding_size, num_levels=len(sam.feature_layers), dim=dim, heads=heads,
        scales=tuple(scales), sam_identity=sam.identity(), text_encoder_identity=text_encoder.identity())
    torch.manual_seed(seed)
    return MultiScaleAdapters(config).to(sam.device)


@dataclass
class Components:
    mllm: FrozenMLLM
    sam: FrozenSAM
    text_encoder: FrozenTextEncoder
    adapters: MultiScaleAdapters


def build_components(preset: Preset, *, device: str = "cpu", dtype: str | None = "auto",
                     quantization: Quantization = None, mllm: str | None = None, sam_checkpoint: str | None = None,
                     clip_pretrained: str | None = None, adapters: str | Path | None = None) -> Components:
    """Build every model of ``preset`` (overrides replace the preset's sources)."""
    frozen_mllm = build_mllm(mllm or preset.mllm, device=device, dtype=dtype, quantization=quantization)
    sam = build_sam(preset.sam_type, sam_checkpoint or preset.sam_checkpoint, device=device)
    text_encoder = build_text_encoder(preset.clip_model, clip_pretrained or preset.clip_pretrained, device=device)
    adapter_source = str(adapters) if adapters is not None else preset.adapters
    if adapter_source is None:
        trained = new_adapters(sam, text_encoder, dim=preset.adapter_dim, heads=preset.adapter_heads,
                               scales=preset.adapter_scales)
    else:
        trained = load_adapters(resolve_path(adapter_source), sam_identity=sam.identity(),
                                text_encoder_identity=text_encoder.identity()).to(device)
    return Components(frozen_mllm, sam, text_encoder, trained)
