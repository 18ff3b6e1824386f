"""The card written beside trained adapters: how they were made and what they scored (``card.json`` + README)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from llavaseg.atomic import atomic_write_text
from llavaseg.data.registry import DataSource
from llavaseg.paths import portable_path
from llavaseg.provenance import machine
from llavaseg.train.config import LossPoint, TrainConfig, ValPoint

__all__ = ["adapter_card", "write_card"]


def adapter_card(config: TrainConfig, *, sources: list[DataSource], final: ValPoint | None, n_val: int,
                 n_train: int, parameter_count: int, train_seconds: float, cache_seconds: float,
                 losses: list[LossPoint], val_history: list[ValPoint], frozen_models: dict[str, Any]) -> dict[str, Any]:
    """Everything worth knowing about a finished run, JSON-ready (paths made portable)."""
    data = [{**s.model_dump(mode="json"), "path": portable_path(s.path)} for s in sources]
    val_data = config.val_data or config.data
    return {
        "name": Path(config.out).name,
        "trained_with": "llavaseg.train.train_adapters",
        "preset": config.preset,
        "data": data,
        "val": {"data": portable_path(val_data) if val_data else "(default)", "split": config.val_split,
                "first_text_only": config.val_first_text_only, "n_queries": n_val,
                **({"giou": final.giou, "ciou": final.ciou, "giou_description_only": final.giou_noattr,
                    "ciou_description_only": final.ciou_noattr} if final else {})},
        "steps": config.steps, "batch_size": config.batch_size, "seed": config.seed,
        "stage_source": config.stage_source,
        "n_train_queries": n_train,
        "parameter_count": parameter_count,
        "train_wall_seconds": round(train_seconds, 1),
        "cache_build_seconds_this_run": round(cache_seconds, 1),
        "final_loss": losses[-1].model_dump() if losses else None,
        "loss_curve": [p.model_dump() for p in losses[:: max(1, len(losses) // 20)]],
        "val_history": [p.model_dump() for p in val_history],
        "config": config.model_dump(mode="json"),
        "frozen_models": frozen_models,
        "torch": torch.__version__, "python": platform.python_version(), "machine": machine(),
    }


def write_card(directory: Path, card: dict[str, Any]) -> None:
    atomic_write_text(directory / "card.json", json.dumps(card, indent=2, default=str))
    atomic_write_text(directory / "README.md", card_readme(card))


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def card_readme(card: dict[str, Any]) -> str:
    """A short human-readable summary of ``card``."""
    val = card["val"]
    untrained = next((p for p in card["val_history"] if p["step"] == 0), {})
    first, last = (card["loss_curve"][0] if card["loss_curve"] else None), card["final_loss"]
    return (
        f"# Adapters `{card['name']}`\n\n"
        "Multi-scale adapters of the LLaVASeg-style route (the only trainable part; MLLM, text encoder and SAM "
        "are frozen). Load with `Segmenter.from_preset(..., adapters=DIR)` or a preset naming this folder.\n\n"
        f"- preset: `{card['preset']}`; stage outputs: `{card['stage_source']}`\n"
        f"- data: {', '.join(d['path'] + ':' + d['split'] + ' @' + str(d['rate']) for d in card['data'])} "
        f"({card['n_train_queries']} queries)\n"
        f"- steps: {card['steps']} x batch {card['batch_size']}, seed {card['seed']}, "
        f"{card['train_wall_seconds']} s training wall time\n"
        f"- trainable parameters: {card['parameter_count']:,}\n"
        f"- loss: {first['loss'] if first else float('nan'):.4f} (step {first['step'] if first else 0}) -> "
        f"{last['loss'] if last else float('nan'):.4f} (step {last['step'] if last else 0})\n"
        f"- val ({val['split']}, {val['n_queries']} queries, first text per image): gIoU {_fmt(val.get('giou'))}, "
        f"cIoU {_fmt(val.get('ciou'))}; description only: gIoU {_fmt(val.get('giou_description_only'))}, "
        f"cIoU {_fmt(val.get('ciou_description_only'))} (cached frozen features, LISA metrics, %)\n"
        f"- untrained (step 0) adapters on the same val: gIoU {_fmt(untrained.get('giou'))}, "
        f"cIoU {_fmt(untrained.get('ciou'))}\n\n"
        "Full details (config, frozen model identities, loss curve, validation history) are in `card.json`.\n"
    )
