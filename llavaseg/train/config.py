"""What defines an adapter training run (``TrainConfig``) and what it reports (``TrainResult``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llavaseg.data.registry import DataSource
from llavaseg.models.components import ComponentSpec

__all__ = ["DataSource", "TrainConfig", "ValPoint", "LossPoint", "TrainResult", "RESUME_FREE_FIELDS"]


class TrainConfig(BaseModel):
    """Everything that defines an adapter training run (JSON-serialisable: ``--config file.json``)."""

    model_config = ConfigDict(extra="forbid")

    data: Path | None = Field(None, description="ReasonSeg-format root (default for tiny-world: the generated tiny world)")
    mixture: list[DataSource] = Field(default_factory=list, description="train on these sources with rates instead of `data`")
    split: str = "train"
    val_data: Path | None = Field(None, description="ReasonSeg-format root for validation (default: data)")
    val_split: str | None = "val"
    val_first_text_only: bool = True  # LISA's validate() scores only the first text per image
    validation: DataSource | None = Field(None, description="validate on this source (any dataset kind) instead "
                                                            "of val_data/val_split")
    preset: str = "tiny-world"
    components: ComponentSpec | None = Field(None, description="frozen-model sources replacing the preset's")
    init_adapters: Path | None = Field(None, description="start from these trained adapters (fine-tuning)")
    prompts_dir: Path | None = Field(None, description="prompt templates (stage_source=mllm; default: shipped)")
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "linear"] = "cosine"
    grad_clip: float | None = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    attribute_dropout: float = Field(0.0, ge=0.0, le=1.0,
                                     description="probability of training a sample on its description alone")
    seed: int = 0
    eval_every: int = Field(200, ge=0)
    checkpoint_every: int = Field(100, ge=0)
    out: Path = Path("adapters/custom")
    device: str = "cpu"
    stage_source: Literal["mllm", "teacher"] = "mllm"
    cache_dir: Path | None = None
    cache_namespace: bool = False
    cache_batch_size: int = Field(8, ge=1)
    checkpoint_dir: Path | None = None
    resume: bool = True
    threads: int | None = None
    adapter_dim: int | None = None
    adapter_heads: int | None = None
    adapter_scales: tuple[int, ...] | None = None
    progress: bool = True

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device must be cpu, cuda[:N] or mps, got {value!r}")
        return value


# Fields that do not change the trained weights: they may differ between a run and its resumption.
RESUME_FREE_FIELDS = {"eval_every", "checkpoint_every", "out", "device", "cache_dir", "cache_namespace",
                      "cache_batch_size", "checkpoint_dir", "resume", "threads", "progress", "val_data", "val_split",
                      "val_first_text_only", "validation"}


class ValPoint(BaseModel):
    step: int
    giou: float | None
    ciou: float | None
    giou_noattr: float | None = None
    ciou_noattr: float | None = None
    n_queries: int


class LossPoint(BaseModel):
    step: int
    loss: float
    bce: float
    dice: float
    lr: float


class TrainResult(BaseModel):
    """What a run produced. ``completed`` is False when it stopped early (``stop_after``): resume it."""

    out: Path | None
    checkpoint_dir: Path
    completed: bool
    step: int
    steps: int
    parameter_count: int
    losses: list[LossPoint]
    val_history: list[ValPoint]
    val: ValPoint | None
    resumed_from: int | None
    cache_seconds: float
    train_seconds: float
    wall_seconds: float
    step_seconds: float | None
    n_train_queries: int
    n_val_queries: int
