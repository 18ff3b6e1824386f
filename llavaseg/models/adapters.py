"""Multi-scale attribute adapters: the only trainable part of the LLaVASeg route.

A small set of learned prompt queries reads the text embeddings (target description + one per attribute),
then attends to the frozen SAM image encoder's features at several depths and spatial scales (coarse to fine),
and is projected into SAM's prompt space as *sparse* prompt tokens. Optionally a text-conditioned *dense*
prompt is added to SAM's no-mask embedding. Everything else (MLLM, text encoder, SAM) stays frozen, and
gradients reach these parameters through the frozen mask decoder.

This is a reconstruction ("LLaVASeg-style"): the paper's exact adapter design is not public (see
``docs/lisa.md`` §1); the configuration records every choice made here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from llavaseg.atomic import atomic_write
from llavaseg.errors import CheckpointMismatchError, InputError
from llavaseg.models.common import WEIGHT_FILE_ERRORS, weights_error

ADAPTER_FORMAT_VERSION = 1


class AdapterConfig(BaseModel):
    """Architecture of the adapters plus the identities of the frozen models they were trained against."""

    model_config = ConfigDict(frozen=True)

    text_dim: int
    level_dim: int
    prompt_dim: int
    grid: int
    num_levels: int
    dim: int = 128
    heads: int = 4
    num_prompts: int = 4
    scales: tuple[int, ...] = (4, 2, 1)  # pooling factor per level, coarse -> fine; len == num_levels + 1
    max_text_tokens: int = 8
    dense: bool = True
    sam_identity: dict[str, str] = {}
    text_encoder_identity: dict[str, str] = {}
    format_version: int = ADAPTER_FORMAT_VERSION
    # Channels per level when they differ (SAM 2's pyramid: 32 and 64); empty = every level has level_dim. Left
    # out of config.json when empty, so SAM 1 adapters' files are as before.
    level_dims: tuple[int, ...] = Field((), exclude_if=lambda dims: not dims)

    def dims_of_levels(self) -> tuple[int, ...]:
        return self.level_dims or (self.level_dim,) * self.num_levels

    @model_validator(mode="after")
    def _consistent(self) -> AdapterConfig:
        """Shapes that fit together, checked when the config is read (not deep inside torch later)."""
        sizes = {"text_dim": self.text_dim, "level_dim": self.level_dim, "prompt_dim": self.prompt_dim,
                 "grid": self.grid, "dim": self.dim, "heads": self.heads, "num_prompts": self.num_prompts,
                 "max_text_tokens": self.max_text_tokens}
        small = [f"{name}={value}" for name, value in sizes.items() if value < 1]
        if small or self.num_levels < 0 or any(scale < 1 for scale in self.scales):
            raise ValueError(f"sizes must be positive: {', '.join(small) or f'scales={self.scales}'}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if len(self.scales) != self.num_levels + 1:
            raise ValueError(f"scales {self.scales} need one entry per level plus the final embedding "
                             f"({self.num_levels + 1})")
        uneven = [scale for scale in self.scales if self.grid % scale]
        if uneven:
            raise ValueError(f"grid {self.grid} is not divisible by scale(s) {uneven}")
        if self.level_dims and (len(self.level_dims) != self.num_levels or min(self.level_dims) < 1):
            raise ValueError(f"level_dims {self.level_dims} need {self.num_levels} positive entries")
        if self.format_version != ADAPTER_FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version}, this llavaseg reads {ADAPTER_FORMAT_VERSION}")
        return self

    def check_identities(self, where: str | Path) -> None:
        """Saved adapters must name the SAM and text encoder they were trained for: an empty identity would
        silently turn off the check that they are used with those models."""
        for label, identity in (("sam_identity", self.sam_identity), ("text_encoder_identity",
                                                                      self.text_encoder_identity)):
            if not identity or not all(str(value).strip() for value in identity.values()):
                raise CheckpointMismatchError(f"{where}: {label} is missing or empty; adapters must record the "
                                              "frozen models they were trained for")


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (grid*grid x dim): lets attention tell left from right at any scale."""
    quarter = dim // 4
    omega = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))
    coords = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 * torch.pi
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    parts = [torch.sin(ys.flatten()[:, None] * omega), torch.cos(ys.flatten()[:, None] * omega),
             torch.sin(xs.flatten()[:, None] * omega), torch.cos(xs.flatten()[:, None] * omega)]
    pos = torch.cat(parts, dim=1)
    return F.pad(pos, (0, dim - pos.shape[1]))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention then MLP, with residuals (queries attend to one key/value set)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_padding: torch.Tensor | None = None
                ) -> torch.Tensor:
        kv = self.norm_kv(keys)
        attended, _ = self.attn(self.norm_q(queries), kv, kv, key_padding_mask=key_padding, need_weights=False)
        queries = queries + attended
        return queries + self.mlp(self.norm_mlp(queries))


class MultiScaleAdapters(nn.Module):
    """Text (description + attributes) -> SAM prompt embeddings, reading frozen SAM features at several scales.

    Inputs: ``text`` B x T x text_dim with ``text_mask`` B x T (True = real token), ``levels`` (one
    B x level_dim x g x g tensor per chosen encoder block) and the final ``embedding`` B x prompt_dim x g x g.
    Outputs: sparse prompts B x num_prompts x prompt_dim, and a dense prompt delta B x prompt_dim x g x g (or None).
    """

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.text_proj = nn.Linear(config.text_dim, d)
        self.slot = nn.Embedding(config.max_text_tokens, d)  # 0 = description, 1.. = attribute order
        self.queries = nn.Parameter(torch.randn(config.num_prompts, d) * 0.02)
        self.read_text = CrossBlock(d, config.heads)
        self.level_proj = nn.ModuleList(
            [nn.Linear(dim, d) for dim in config.dims_of_levels()] + [nn.Linear(config.prompt_dim, d)])
        self.read_image = nn.ModuleList([CrossBlock(d, config.heads) for _ in config.scales])
        for index, scale in enumerate(config.scales):
            self.register_buffer(f"pos_{index}", sincos_2d(config.grid // scale, d), persistent=False)
        self.to_sparse = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, config.prompt_dim))
        if config.dense:
            self.text_gate = nn.Linear(d, config.prompt_dim)
            self.to_dense = nn.Conv2d(config.prompt_dim, config.prompt_dim, kernel_size=1)
            nn.init.zeros_(self.to_dense.weight)  # start as SAM's plain no-mask prompt
            nn.init.zeros_(self.to_dense.bias)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, levels: list[torch.Tensor],
                embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, _ = text.shape
        slots = self.slot(torch.arange(tokens, device=text.device).clamp(max=self.config.max_text_tokens - 1))
        text_tokens = self.text_proj(text) + slots
        queries = self.queries.expand(batch, -1, -1)
        queries = self.read_text(queries, text_tokens, key_padding=~text_mask)
        sources = [*levels, embedding]
        for index, (source, scale) in enumerate(zip(sources, self.config.scales)):
            # every source is read at grid/scale: a level finer than the embedding (SAM 2) pools more
            kernel = source.shape[-1] // (self.config.grid // scale)
            if kernel * (self.config.grid // scale) != source.shape[-1]:
                raise InputError(f"adapter level {index} is {source.shape[-1]} wide, not a multiple of "
                                 f"{self.config.grid // scale} (grid {self.config.grid} / scale {scale})")
            pooled = F.avg_pool2d(source, kernel) if kernel > 1 else source
            flat = self.level_proj[index](pooled.flatten(2).transpose(1, 2)) + getattr(self, f"pos_{index}")
            queries = self.read_image[index](queries, flat)
        sparse = self.to_sparse(queries)
        dense = None
        if self.config.dense:
            weights = text_mask.float().unsqueeze(-1)
            pooled_text = (text_tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            gate = self.text_gate(pooled_text)[:, :, None, None]
            dense = self.to_dense(embedding * gate)
        return sparse, dense

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def fingerprint(self) -> str:
        """Hash of every weight's bytes (results record which adapters produced them)."""
        digest = hashlib.blake2b(digest_size=8)
        for key, tensor in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()




def save_adapters(adapters: MultiScaleAdapters, directory: str | Path, card: dict | None = None) -> Path:
    """Write ``adapters.safetensors`` + ``config.json`` (+ ``card.json``) atomically into ``directory``."""
    directory = Path(directory)
    adapters.config.check_identities(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in adapters.state_dict().items()}
    atomic_write(directory / "adapters.safetensors", lambda p: save_file(state, str(p), metadata={"format": "llavaseg-adapters"}))
    atomic_write(directory / "config.json", lambda p: p.write_text(adapters.config.model_dump_json(indent=2)))
    if card is not None:
        atomic_write(directory / "card.json", lambda p: p.write_text(json.dumps(card, indent=2, default=str)))
    return directory


def load_adapters(directory: str | Path, *, sam_identity: dict[str, str] | None = None,
                  text_encoder_identity: dict[str, str] | None = None) -> MultiScaleAdapters:
    """Load adapters, refusing them when they were trained against another SAM or text encoder."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "adapters.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointMismatchError(f"{directory} holds no adapters (needs config.json and adapters.safetensors)")
    try:
        config = AdapterConfig.model_validate_json(config_path.read_text())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise CheckpointMismatchError(f"{config_path}: not a valid adapter config ({where + ': ' if where else ''}"
                                      f"{first['msg']})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointMismatchError(f"{config_path}: not an adapter config ({exc.__class__.__name__})") from None
    config.check_identities(config_path)
    for label, wanted, recorded in (("SAM", sam_identity, config.sam_identity),
                                    ("text encoder", text_encoder_identity, config.text_encoder_identity)):
        if wanted is not None and recorded and dict(recorded) != dict(wanted):
            raise CheckpointMismatchError(
                f"adapters in {directory} were trained for {label} {dict(recorded)}, not {dict(wanted)}")
    adapters = MultiScaleAdapters(config)
    try:
        state = load_file(str(weights_path))
    except WEIGHT_FILE_ERRORS as exc:
        raise weights_error("adapter weights", weights_path, exc) from None
    try:
        adapters.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointMismatchError(f"{weights_path} does not match its config: {str(exc).splitlines()[0]}") from None
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise CheckpointMismatchError(f"{weights_path}: {len(bad)} tensor(s) hold NaN or infinite values "
                                      f"(first: {bad[0]}); the adapters are broken, retrain or re-download them")
    return adapters
