"""Where each component of a pipeline comes from (:class:`ComponentSpec`), checked cheaply, then built.

A spec is plain data, so presets, command-line flags, pipeline manifests and run records all hold the same
thing. :func:`check_spec` validates every source (files exist and have the right layout, names are known,
trainable parts a route needs are given) without importing torch or loading a model, so a typo costs well
under a second; :func:`build_components` then loads the models.

Source strings, one per component (see :mod:`llavaseg.models.sources` for ``pkg:``/``random:``):

* ``mllm``: a Hugging Face id or a local ``save_pretrained`` folder (any image-text-to-text model with a chat
  template), ``pkg:...`` for shipped ones, ``random:tiny``;
* ``sam``: a segment_anything checkpoint file (``.pth``/``.pt``/``.safetensors``; the ViT type is read from
  its tensors), a bare file name looked up in the weights folders, or ``random:<spec>``;
* ``clip``: an open_clip model ``NAME``, ``NAME:TAG`` (a pretrained tag; QuickGELU as open_clip's pretrained
  config says) or ``NAME:FILE``, ``local-dir:DIR`` (``open_clip_config.json`` + weights), or ``random:NAME``;
* ``adapters``: a folder written by ``llavaseg-train`` (``config.json`` + ``adapters.safetensors``);
* ``seg_token``: a ``[SEG]`` model folder of ours (``seg_token.json``) or a LISA release folder (its
  ``config.json`` has ``out_dim``; then ``vision_tower`` names the CLIP vision folder LISA was trained with);
* ``seg_token_cot``: a ``[SEG]`` model of ours trained to write the target's attributes before ``[SEG]``
  (the ``seg-token-cot`` route).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llavaseg.errors import CheckpointMismatchError, InputError, UntrainedError
from llavaseg.models.segmenters import SAM_SUFFIXES, build_segmenter, check_segmenter
from llavaseg.models.sources import (
    HUB_ID,
    find_weights_file,
    in_hub_cache,
    parse_source,
    read_json,
    weights_search_path,
)

if TYPE_CHECKING:  # pragma: no cover
    from llavaseg.models.adapters import MultiScaleAdapters
    from llavaseg.models.mllm import FrozenMLLM, Quantization
    from llavaseg.models.segmenters import FrozenSegmenter
    from llavaseg.models.text_encoder import FrozenTextEncoder

__all__ = ["ComponentSpec", "Components", "TrainedPart", "SAM_SUFFIXES", "weights_search_path", "find_weights_file",
           "check_spec", "build_components", "build_mllm", "build_sam", "build_text_encoder", "new_adapters",
           "open_text_encoder"]

TrainedPart = Literal["adapters", "seg_token", "seg_token_cot"]


class ComponentSpec(BaseModel):
    """The source of every component, plus the adapter architecture used when adapters are created."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mllm: str
    sam: str
    clip: str
    adapters: str | None = None
    seg_token: str | None = None
    seg_token_cot: str | None = None
    vision_tower: str | None = None
    adapter_dim: int = Field(128, ge=8)
    adapter_heads: int = Field(4, ge=1)
    adapter_scales: tuple[int, ...] = (4, 2, 1)

    def with_sources(self, **overrides: str | None) -> ComponentSpec:
        """A copy with the given (non-None) sources replaced.

        Trained parts belong to the frozen models they were trained with: a new SAM or text encoder drops the
        adapters, a new MLLM or SAM drops the ``[SEG]`` model, unless those are given too.
        """
        update = {k: v for k, v in overrides.items() if v is not None}
        changed = {k for k in ("mllm", "sam", "clip") if k in update and update[k] != getattr(self, k)}
        if changed & {"sam", "clip"} and "adapters" not in update:
            update["adapters"] = None
        for part in ("seg_token", "seg_token_cot"):
            if changed & {"mllm", "sam"} and part not in update:
                update[part] = None
        return self.model_copy(update=update)


@dataclass
class Components:
    """The built components. ``adapters`` is None when none were given and untrained ones were not allowed;
    ``untrained`` names the parts that are random weights (results record it)."""

    mllm: FrozenMLLM
    sam: FrozenSegmenter
    text_encoder: FrozenTextEncoder
    adapters: MultiScaleAdapters | None
    spec: ComponentSpec | None = None
    untrained: tuple[str, ...] = ()
    notices: tuple[str, ...] = ()
    seg_token_source: str | None = None
    seg_token_cot_source: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ cheap checks
def _check_mllm(source: str) -> None:
    parsed = parse_source(source)
    if parsed.scheme == "random":
        if parsed.value != "tiny":
            raise InputError(f"unknown random MLLM {source!r}; only 'random:tiny' exists")
        return
    path = parsed.path()
    if path is not None and path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"--mllm {source}: {path} is not a transformers model folder (no config.json)")
        return
    if parsed.shipped:
        raise InputError(f"the shipped MLLM {source} is missing from this install ({path})")
    if not HUB_ID.match(source):
        raise InputError(f"--mllm {source}: no such folder, and not a Hugging Face id (org/name)")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not in_hub_cache(source):
        raise InputError(f"--mllm {source}: not a local folder and not in the Hugging Face cache (HF_HUB_OFFLINE=1); "
                         "download it or pass --mllm DIR")


def _open_clip_names() -> set[str]:
    """open_clip's model config names, read from its package folder (no import, so no torch)."""
    spec = util.find_spec("open_clip")
    names = {p.stem for p in Path(__file__).with_name("clip_configs").glob("*.json")}
    if spec is not None and spec.origin:
        names |= {p.stem for p in (Path(spec.origin).parent / "model_configs").glob("*.json")}
    return names


def _check_clip(source: str) -> None:
    parsed = parse_source(source)
    if parsed.scheme == "local-dir":
        path = parsed.path()
        if path is None or not (path / "open_clip_config.json").is_file():
            raise InputError(f"--clip {source}: {path} holds no open_clip_config.json (an open_clip model folder)")
        return
    name, _, weights = parsed.value.partition(":") if parsed.scheme == "random" else source.partition(":")
    if name not in _open_clip_names():
        raise InputError(f"--clip {source}: unknown open_clip model {name!r} (see open_clip.list_models())")
    if parsed.scheme == "random" or not weights:
        return
    if Path(weights).expanduser().suffix:  # a file
        if not Path(weights).expanduser().is_file():
            raise InputError(f"--clip {source}: open_clip weights file not found: {weights}")
        return
    import open_clip  # a tag: only open_clip knows its tags

    if weights not in open_clip.list_pretrained_tags_by_model(name):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise InputError(f"--clip {source}: {name} has no pretrained tag {weights!r} (tags: {tags})")


def _check_adapters(source: str) -> None:
    path = parse_source(source).path()
    if path is None or not (path / "config.json").is_file() or not (path / "adapters.safetensors").is_file():
        raise InputError(f"--adapters {source}: {path} holds no adapters (needs config.json and adapters.safetensors)")


def _check_seg_token(source: str, vision_tower: str | None, flag: str = "--seg-token") -> None:
    path = parse_source(source).path()
    if path is None or not path.is_dir():
        raise InputError(f"{flag} {source}: no such folder ({path})")
    if (path / "seg_token.json").is_file():
        return
    if flag != "--seg-token":
        raise InputError(f"{flag} {source}: not a [SEG] model of ours (no seg_token.json)")
    config = read_json(path / "config.json")
    if isinstance(config, dict) and "out_dim" in config:
        if not vision_tower or not (Path(vision_tower).expanduser() / "config.json").is_file():
            raise InputError(f"--seg-token {source} is a LISA release folder; pass --vision-tower DIR, the CLIP vision "
                             "folder it was trained with (openai/clip-vit-large-patch14 for LISA v1)")
        return
    raise InputError(f"--seg-token {source}: neither a [SEG] model of ours (seg_token.json) nor a LISA release "
                     "(config.json with out_dim)")


_TRAIN_HINTS = {
    "adapters": "train them: llavaseg-train --preset PRESET --out DIR (then --adapters DIR)",
    "seg_token": "train one: python -m llavaseg.recipes.train_seg_token --out DIR (then --seg-token DIR), or pass "
                 "a LISA release folder",
    "seg_token_cot": "train one: python -m llavaseg.recipes.train_seg_token --answer-style attributes-first "
                     "--out DIR (then --seg-token-cot DIR)",
}


def check_spec(spec: ComponentSpec, *, needs: dict[str, tuple[str, ...]] | None = None,
               allow_untrained: bool = False) -> tuple[str, ...]:
    """Validate every source of ``spec`` (no model loads) and the trainable parts the named routes need.

    ``needs`` maps route names to the trained parts each requires (the route registry knows them). A part
    that is missing is refused with :class:`~llavaseg.errors.UntrainedError` naming it and the command that
    trains it, unless ``allow_untrained`` (plumbing runs). Returns the parts that will be random (frozen models
    given as ``random:...`` included).
    """
    untrained: list[str] = [kind for kind in ("mllm", "sam", "clip")
                            if parse_source(getattr(spec, kind)).scheme == "random"]
    for route, parts in (needs or {}).items():
        for part in parts:
            if getattr(spec, part) is None and part not in untrained:
                if not allow_untrained:
                    raise UntrainedError(f"route {route} needs trained {part.replace('_', ' ')} and none were given; "
                                         f"{_TRAIN_HINTS[part]}; or pass --allow-untrained for a plumbing run")
                untrained.append(part)
    _check_mllm(spec.mllm)
    check_segmenter(spec.sam)
    _check_clip(spec.clip)
    if spec.adapters is not None:
        _check_adapters(spec.adapters)
    if spec.seg_token is not None:
        _check_seg_token(spec.seg_token, spec.vision_tower)
    if spec.seg_token_cot is not None:
        _check_seg_token(spec.seg_token_cot, None, "--seg-token-cot")
    return tuple(untrained)


# ---------------------------------------------------------------------------------------------- building
def build_mllm(source: str, *, device: str, dtype: str | None, quantization: Quantization = None,
               seed: int = 0) -> FrozenMLLM:
    from llavaseg.models.mllm import FrozenMLLM

    parsed = parse_source(source)
    if parsed.scheme == "random":
        from llavaseg.errors import UnsupportedError
        from llavaseg.models.tiny_llava import build_tiny_llava, tiny_vocabulary

        _check_mllm(source)
        if quantization is not None:
            raise UnsupportedError("quantization needs a saved model; save the tiny model and load it from disk")
        model, processor = build_tiny_llava(tiny_vocabulary(), seed=seed)
        # A random model never emits end-of-sequence on purpose: cap its answers to keep plumbing fast.
        return FrozenMLLM(model.to(device), processor, name="random:tiny", max_new_tokens=12)
    path = parsed.path()
    if parsed.shipped and not path.is_dir():
        raise InputError(f"the shipped model {source} is missing from this install ({path})")
    return FrozenMLLM.from_pretrained(parsed.resolved(), device=device, dtype=dtype, quantization=quantization,
                                      local_files_only=path.exists())


def build_sam(source: str, checkpoint: str | None = None, *, device: str) -> FrozenSegmenter:
    """A frozen segmenter (SAM or SAM 2, see :mod:`llavaseg.models.segmenters`) from a source string. (The older
    form ``build_sam(spec_name, checkpoint)`` is accepted: a registered SAM spec name with an optional checkpoint.)"""
    from llavaseg.models.sam_spec import SAM_SPECS

    if source in SAM_SPECS:
        source = checkpoint or f"random:{source}"
    check_segmenter(source)
    return build_segmenter(source, device=device)


def build_text_encoder(model: str, pretrained: str | None, *, device: str) -> FrozenTextEncoder:
    """An open_clip model by name (``local-dir:`` folders included) with optional pretrained tag or file."""
    from llavaseg.models.text_encoder import FrozenTextEncoder

    return FrozenTextEncoder.create(parse_source(model).resolved(), pretrained, device=device)


def open_text_encoder(source: str, *, device: str) -> FrozenTextEncoder:
    """An open_clip model from a ``--clip`` source string (see the module docstring)."""
    parsed = parse_source(source)
    if parsed.scheme == "random":
        return build_text_encoder(parsed.value, None, device=device)
    if parsed.scheme == "local-dir":
        return build_text_encoder(source, None, device=device)
    name, _, weights = source.partition(":")
    return build_text_encoder(name, weights or None, device=device)


def new_adapters(sam: FrozenSegmenter, text_encoder: FrozenTextEncoder, *, dim: int, heads: int,
                 scales: tuple[int, ...], seed: int = 0) -> MultiScaleAdapters:
    """Randomly initialised adapters sized for ``sam`` and ``text_encoder`` (the start of training)."""
    import torch

    from llavaseg.models.adapters import AdapterConfig, MultiScaleAdapters

    dims = tuple(sam.level_dims)
    config = AdapterConfig(
        text_dim=text_encoder.dim, level_dim=dims[0], prompt_dim=sam.prompt_dim, grid=sam.grid,
        num_levels=len(dims), dim=dim, heads=heads, scales=tuple(scales),
        level_dims=dims if len(set(dims)) > 1 else (),  # SAM 1 configs stay as they were
        sam_identity=sam.identity(), text_encoder_identity=text_encoder.identity())
    torch.manual_seed(seed)
    return MultiScaleAdapters(config).to(sam.device)


def build_components(spec: ComponentSpec, *, device: str = "cpu", dtype: str | None = "auto",
                     quantization: Quantization = None, untrained: tuple[str, ...] = (),
                     allow_untrained: bool = False, notices: tuple[str, ...] = ()) -> Components:
    """Build every model of ``spec``; adapters are random only when allowed (then listed in ``untrained``)."""
    from llavaseg.models.adapters import load_adapters

    mllm = build_mllm(spec.mllm, device=device, dtype=dtype, quantization=quantization)
    sam = build_sam(spec.sam, device=device)
    text_encoder = open_text_encoder(spec.clip, device=device)
    untrained = tuple(untrained)
    if spec.adapters is not None:
        adapters = load_adapters(parse_source(spec.adapters).path(), sam_identity=sam.identity(),
                                 text_encoder_identity=text_encoder.identity()).to(device)
    elif allow_untrained or "adapters" in untrained:
        adapters = new_adapters(sam, text_encoder, dim=spec.adapter_dim, heads=spec.adapter_heads,
                                scales=spec.adapter_scales)
        untrained = tuple(dict.fromkeys((*untrained, "adapters")))
    else:
        adapters = None
    for part in ("seg_token", "seg_token_cot"):
        if getattr(spec, part) is None and allow_untrained:
            untrained = tuple(dict.fromkeys((*untrained, part)))
    return Components(mllm, sam, text_encoder, adapters, spec=spec, untrained=untrained, notices=tuple(notices),
                      seg_token_source=spec.seg_token, seg_token_cot_source=spec.seg_token_cot)


def check_identity(kind: str, recorded: dict[str, str], actual: dict[str, str], where: str) -> None:
    """Refuse a component whose identity is not the one a manifest or card recorded."""
    if dict(recorded) != dict(actual):
        raise CheckpointMismatchError(f"{where}: the {kind} loaded ({actual}) is not the one recorded ({recorded})")
