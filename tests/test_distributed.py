"""torchrun with two CPU processes (gloo) against one process: the same adapters, within float tolerance."""

from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def world_data(make_tiny_world):
    return make_tiny_world(seed=51, sizes={"train": 4, "val": 1})


def _train(data, tmp_path, name: str, processes: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(processes)] if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "llavaseg.cli.train", "--preset", "tiny", "--data", str(data), "--val-split",
               "none", "--steps", "4", "--batch-size", "4", "--stage-source", "teacher", "--cache-batch-size", "2",
               "--cache-dir", str(tmp_path / f"cache-{name}"), "--checkpoint-dir", str(tmp_path / f"ckpt-{name}"),
               "--out", str(tmp_path / name), "--quiet", "--threads", "1"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _why(run: subprocess.CompletedProcess) -> str:
    """A failed run's own one-line errors first (torchrun's report after them would hide them), then its tail."""
    own = [line for line in run.stderr.splitlines() if line.startswith("llavaseg")]
    return "\n".join(own) + "\n" + run.stderr[-1500:]


def test_two_process_training_equals_one_process(world_data, tmp_path) -> None:
    one, two = _train(world_data, tmp_path, "one", 1), _train(world_data, tmp_path, "two", 2)
    assert one.returncode == 0, _why(one)
    assert two.returncode == 0, _why(two)
    a = load_file(str(tmp_path / "one" / "adapters.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert two.stdout.count("adapters:") == 1  # one report, from rank 0
    # each rank built its share of the cache chunks; together they hold every chunk one process builds
    import json

    shards = [set(json.loads(next((tmp_path / f"cache-{n}").rglob("index.json")).read_text())["shards"])
              for n in ("one", "two")]
    assert shards[0] == shards[1]


def _bench(out, processes: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(processes)] if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "llavaseg.cli.bench", "reasonseg", "--limit", "8", "--routes",
               "llavaseg,training-free", "--no-dialogue", "--batch-size", "2", "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_two_process_benchmark_equals_one_process(tmp_path) -> None:
    import json

    one, two = _bench(tmp_path / "one", 1), _bench(tmp_path / "two", 2)
    assert one.returncode == 0, _why(one)
    assert two.returncode == 0, _why(two)
    for route in ("llavaseg", "training-free"):
        rows = [[json.loads(line) for line in (tmp_path / name / f"queries-{route}.jsonl").read_text().splitlines()]
                for name in ("one", "two")]
        assert [(r["query_id"], r["iou"], r["mask"]) for r in rows[0]] == [(r["query_id"], r["iou"], r["mask"])
                                                                           for r in rows[1]]
    metrics = [json.loads((tmp_path / name / "results.json").read_text())["routes"] for name in ("one", "two")]
    assert {k: v["metrics"] for k, v in metrics[0].items()} == {k: v["metrics"] for k, v in metrics[1].items()}
    assert not list((tmp_path / "two").glob("*.rank*.jsonl"))  # merged by rank 0
