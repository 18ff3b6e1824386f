"""Slow checks (``python -m pytest -m slow``): the shipped tiny-world weights regenerate from their recorded configs.

The adapters take a few minutes on one thread. Byte equality holds on the machine kind the card records (torch
build, CPU model, threads: floating-point summation order differs between them); elsewhere the val figure must
agree within noise.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from llavaseg.provenance import same_machine_kind

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "adapters" / "tiny-world"


@pytest.mark.slow
def test_tiny_world_adapters_regenerate_byte_for_byte(tmp_path: Path) -> None:
    from llavaseg.train import TrainConfig, train_adapters

    card = json.loads((SHIPPED / "card.json").read_text())
    config = TrainConfig.model_validate({**card["config"], "out": tmp_path / "tiny-world",
                                         "cache_dir": tmp_path / "cache", "checkpoint_dir": tmp_path / "ckpt",
                                         "eval_every": 0, "progress": False})
    result = train_adapters(config)
    assert result.completed and result.val is not None
    if not same_machine_kind(card.get("machine"), threads=1):  # another build or CPU: figures within noise
        assert abs(result.val.giou - card["val"]["giou"]) < 0.02
        return
    assert result.val.giou == card["val"]["giou"]
    digest = [hashlib.sha256((d / "adapters.safetensors").read_bytes()).hexdigest() for d in (SHIPPED, config.out)]
    assert digest[0] == digest[1]
