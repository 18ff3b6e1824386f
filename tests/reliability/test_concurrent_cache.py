"""Two trainings on different data sharing one feature-cache folder, at the same time, as two processes.

Before the cache named shards by content and merged its index under a lock, the second run overwrote the
first one's shard files and index, and both (and every later run) trained on a mix. Each run here must end
with the very weights it gets alone, with its own cache folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _train(data: Path, cache: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "llavaseg.cli.train", "--preset", "tiny", "--data", str(data), "--val-split",
            "none", "--steps", "4", "--batch-size", "2", "--cache-dir", str(cache), "--cache-batch-size", "3",
            "--checkpoint-dir", str(out) + "-ckpt", "--out", str(out), "--threads", "1", "--quiet"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_data_sets(make_tiny_world):
    first = make_tiny_world(seed=11, sizes={"train": 5, "val": 1})
    second = make_tiny_world(seed=12, sizes={"train": 5, "val": 1})
    for name in ("train_00000", "train_00001"):  # shared images and queries, at other positions and batches
        for suffix in (".json", ".png"):
            shutil.copy(first / "train" / f"{name}{suffix}", second / "train" / f"zz_{name}{suffix}")
    return first, second


def test_two_concurrent_trainings_on_one_cache_get_their_own_weights(two_data_sets, tmp_path) -> None:
    first, second = two_data_sets
    shared = tmp_path / "shared-cache"
    runs = [subprocess.Popen(_train(data, shared, tmp_path / f"together-{i}"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i, data in enumerate((first, second))]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    for i, data in enumerate((first, second)):
        alone = subprocess.run(_train(data, tmp_path / f"cache-alone-{i}", tmp_path / f"alone-{i}"),
                               capture_output=True, text=True, timeout=600)
        assert alone.returncode == 0, alone.stderr
        assert _sha(tmp_path / f"together-{i}" / "adapters.safetensors") == \
            _sha(tmp_path / f"alone-{i}" / "adapters.safetensors")
    assert _sha(tmp_path / "together-0" / "adapters.safetensors") != _sha(tmp_path / "together-1" / "adapters.safetensors")
    # the shared index holds both runs' chunks, and every file it names is intact
    index = json.loads(next(shared.rglob("index.json")).read_text())
    folder = next(shared.rglob("index.json")).parent
    alone_chunks = set().union(*(json.loads(next((tmp_path / f"cache-alone-{i}").rglob("index.json")).read_text())
                                 ["shards"] for i in range(2)))  # a chunk both runs hold (same keys, order) once
    assert set(index["shards"]) == alone_chunks
    for record in [*index["shards"].values(), *index["images"].values()]:
        assert hashlib.sha256((folder / record["file"]).read_bytes()).hexdigest() == record["sha256"]
