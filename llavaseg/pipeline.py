"""One folder for a whole pipeline: ``pipeline.json`` (each component's source and identity) + the trained parts.

``Segmenter.save_pretrained(DIR)`` writes, and ``Segmenter.from_pretrained(DIR)`` / ``--pipeline DIR`` read::

    pipeline.json      format, route, each frozen component's source + identity, adapter architecture,
                       which parts are untrained, notices
    adapters/          the adapters (config.json + adapters.safetensors), copied
    seg_token/         our [SEG] model, copied (a LISA release folder is referenced instead: it is the full model)
    prompts/           the stage templates the pipeline was used with, copied

The frozen models are referenced, never copied (a hub id stays a hub id; a local folder is referenced by its
absolute path; shipped ones by ``pkg:``), and their identities are checked when the folder is loaded: a
manifest whose MLLM, SAM or text encoder is no longer the one recorded is refused, not silently reused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from llavaseg.atomic import atomic_write_text
from llavaseg.errors import CheckpointMismatchError
from llavaseg.models.components import Components, ComponentSpec
from llavaseg.models.sources import parse_source
from llavaseg.prompting import PromptSet

__all__ = ["PIPELINE_FILE", "PIPELINE_FORMAT", "ComponentRecord", "PipelineManifest", "save_pipeline",
           "read_pipeline", "check_pipeline_identities"]

PIPELINE_FILE = "pipeline.json"
PIPELINE_FORMAT = "llavaseg-pipeline-v1"


class ComponentRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: str
    identity: dict[str, str]


class PipelineManifest(BaseModel):
    """What ``pipeline.json`` holds."""

    model_config = ConfigDict(extra="forbid")

    format: str = PIPELINE_FORMAT
    route: str
    mllm: ComponentRecord
    sam: ComponentRecord
    clip: ComponentRecord
    adapters: str | None = None
    seg_token: str | None = None
    seg_token_cot: str | None = None
    vision_tower: str | None = None
    adapter_dim: int
    adapter_heads: int
    adapter_scales: tuple[int, ...]
    untrained: list[str] = []
    notices: list[str] = []


def _referenced(source: str) -> str:
    """A source as a manifest keeps it: shipped and hub sources as they are, local paths made absolute."""
    parsed = parse_source(source)
    if parsed.shipped or parsed.scheme == "random":
        return source
    path = parsed.path()
    if path is not None and path.exists():
        absolute = str(path.resolve())
        return f"local-dir:{absolute}" if parsed.scheme == "local-dir" else absolute
    return source


def _keep_seg_token(source: str | None, directory: Path, name: str) -> str | None:
    """Our ``[SEG]`` models are copied into the pipeline (as ``name``); a LISA release is referenced."""
    if source is None:
        return None
    path = parse_source(source).path()
    if path is not None and (path / "seg_token.json").is_file():
        shutil.copytree(path, directory / name, dirs_exist_ok=True)
        return name
    return _referenced(source)


def save_pipeline(directory: Path, components: Components, prompts: PromptSet, route: str) -> Path:
    """Write the pipeline folder (see the module docstring); return the manifest's path."""
    from llavaseg.models.adapters import save_adapters

    spec = components.spec
    if spec is None:
        raise CheckpointMismatchError("a segmenter built from bare models has no component sources to save; "
                                      "build it with Segmenter.from_preset or from_components")
    directory.mkdir(parents=True, exist_ok=True)
    adapters = None
    if components.adapters is not None:
        save_adapters(components.adapters, directory / "adapters")
        adapters = "adapters"
    seg_token = _keep_seg_token(spec.seg_token, directory, "seg_token")
    seg_token_cot = _keep_seg_token(spec.seg_token_cot, directory, "seg_token_cot")
    for stage, template in prompts.templates.items():
        atomic_write_text(directory / "prompts" / f"{stage}.txt", template.text + "\n")
    manifest = PipelineManifest(
        route=route, mllm=ComponentRecord(source=_referenced(spec.mllm), identity=components.mllm.identity()),
        sam=ComponentRecord(source=_referenced(spec.sam), identity=components.sam.identity()),
        clip=ComponentRecord(source=_referenced(spec.clip), identity=components.text_encoder.identity()),
        adapters=adapters, seg_token=seg_token, seg_token_cot=seg_token_cot, vision_tower=_referenced(spec.vision_tower) if spec.vision_tower else None,
        adapter_dim=spec.adapter_dim, adapter_heads=spec.adapter_heads, adapter_scales=spec.adapter_scales,
        untrained=list(components.untrained), notices=list(components.notices))
    path = directory / PIPELINE_FILE
    atomic_write_text(path, manifest.model_dump_json(indent=2) + "\n")
    return path


def read_pipeline(directory: Path) -> tuple[PipelineManifest, ComponentSpec]:
    """The manifest and the component spec it describes (trained parts inside ``directory``); no model loads."""
    path = Path(directory) / PIPELINE_FILE
    if not path.is_file():
        raise CheckpointMismatchError(f"{directory} is not a pipeline folder (no {PIPELINE_FILE})")
    try:
        manifest = PipelineManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError, ValueError) as exc:
        raise CheckpointMismatchError(f"{path}: not a pipeline manifest ({type(exc).__name__})") from None
    if manifest.format != PIPELINE_FORMAT:
        raise CheckpointMismatchError(f"{path}: format {manifest.format!r}, expected {PIPELINE_FORMAT!r}")

    def inside(name: str | None) -> str | None:
        if name is None:
            return None
        return str(Path(directory).resolve() / name) if name in ("adapters", "seg_token", "seg_token_cot") else name

    spec = ComponentSpec(mllm=manifest.mllm.source, sam=manifest.sam.source, clip=manifest.clip.source,
                         adapters=inside(manifest.adapters), seg_token=inside(manifest.seg_token),
                         seg_token_cot=inside(manifest.seg_token_cot),
                         vision_tower=manifest.vision_tower, adapter_dim=manifest.adapter_dim,
                         adapter_heads=manifest.adapter_heads, adapter_scales=manifest.adapter_scales)
    return manifest, spec


def check_pipeline_identities(manifest: PipelineManifest, components: Components, where: Path) -> None:
    """Refuse a pipeline whose frozen models are no longer the ones it was saved with."""
    for name, record, actual in (("MLLM", manifest.mllm, components.mllm.identity()),
                                 ("SAM", manifest.sam, components.sam.identity()),
                                 ("text encoder", manifest.clip, components.text_encoder.identity())):
        if dict(record.identity) != dict(actual):
            raise CheckpointMismatchError(f"{where}: the {name} at {record.source} is not the one this pipeline "
                                          f"was saved with (identity {actual} vs recorded {record.identity})")
