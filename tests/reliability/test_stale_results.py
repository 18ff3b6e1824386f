"""Resumed work is keyed by what produced it: edited data is scored again, a training checkpoint of other
prompts or data is refused, and a build killed half way resumes to the same bits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llavaseg.cli.bench import main as bench
from llavaseg.data.reasonseg import write_reasonseg_sample
from llavaseg.errors import CheckpointMismatchError
from llavaseg.prompting import default_prompts_dir
from llavaseg.train import TrainConfig, train_adapters

RIGHT = [[36, 20], [56, 20], [56, 40], [36, 40]]
LEFT = [[8, 8], [24, 8], [24, 24], [8, 24]]


def _write(root, first_polygon, scene):
    for index, polygon in enumerate((first_polygon, RIGHT)):
        write_reasonseg_sample(root / "val", f"img{index}", Image.fromarray(scene(index)), [f"the square {index}"],
                               False, [{"label": "target", "points": polygon}], image_format="png")


def _bench(root, out) -> dict:
    assert bench(["reasonseg", "--data", str(root), "--preset", "tiny", "--out", str(out), "--routes", "llavaseg",
                  "--no-dialogue"]) == 0
    return json.loads((out / "results.json").read_text())["routes"]["llavaseg"]


def _ious(out) -> dict[str, float]:
    rows = [json.loads(line) for line in (out / "queries-llavaseg.jsonl").read_text().splitlines()]
    return {row["query_id"]: row["iou"] for row in rows}  # the last line of a query is its current record


def test_edited_ground_truth_under_an_old_out_gives_the_fresh_numbers(tmp_path, fast_tiny_models,
                                                                     two_square_scene) -> None:
    root, out = tmp_path / "data", tmp_path / "run"
    _write(root, RIGHT, two_square_scene)
    before = _bench(root, out)
    _write(root, LEFT, two_square_scene)  # the annotator moves the first polygon
    again = _bench(root, out)
    fresh = _bench(root, tmp_path / "fresh")
    assert again["n_resumed"] == 1  # the untouched query is reused, the edited one scored again
    assert again["metrics"] == fresh["metrics"] and _ious(out) == _ious(tmp_path / "fresh")
    assert again["metrics"]["overall"]["giou"] != before["metrics"]["overall"]["giou"]


@pytest.fixture(scope="module")
def world(make_tiny_world):
    return make_tiny_world(seed=21, sizes={"train": 4, "val": 1})


def _config(world, tmp_path, **overrides) -> TrainConfig:
    values = dict(preset="tiny", data=world, steps=4, batch_size=2, lr=2e-3, warmup_steps=1, eval_every=0,
                  checkpoint_every=0, cache_dir=tmp_path / "cache", cache_batch_size=2, val_split=None,
                  checkpoint_dir=tmp_path / "ckpt", out=tmp_path / "out", progress=False, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def test_a_checkpoint_of_other_prompts_or_data_is_refused(world, tmp_path, fast_tiny_models) -> None:
    config = _config(world, tmp_path, cache_namespace=True)
    train_adapters(config, stop_after=1)
    prompts = tmp_path / "prompts"
    shutil.copytree(default_prompts_dir(), prompts)
    (prompts / "reason.txt").write_text((prompts / "reason.txt").read_text() + "\nAnswer briefly.")
    with pytest.raises(CheckpointMismatchError, match="frozen_models"):
        train_adapters(config.model_copy(update={"prompts_dir": prompts}))
    edited = tmp_path / "edited"
    shutil.copytree(world, edited)
    first = sorted((edited / "train").glob("*.json"))[0]
    record = json.loads(first.read_text())
    record["text"] = [text + " please" for text in record["text"]]
    first.write_text(json.dumps(record))
    with pytest.raises(CheckpointMismatchError, match="data"):
        train_adapters(config.model_copy(update={"data": edited}))


class _KilledSAM:
    """TEST DOUBLE: the real frozen SAM, interrupted (as by Ctrl-C or a kill) at its ``after``-th image."""

    def __init__(self, sam, after: int) -> None:
        self.sam, self.after, self.calls = sam, after, 0

    def encode_batch(self, images):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.sam.encode_batch(images)

    def __getattr__(self, name):
        return getattr(self.sam, name)


def test_a_build_killed_half_way_resumes_to_the_same_weights(world, tmp_path, tiny_sam_and_text_encoder) -> None:
    from llavaseg.models.presets import PRESETS

    sam, text_encoder = tiny_sam_and_text_encoder

    class Frozen:
        preset, mllm, prompts = PRESETS["tiny"], None, None

    straight, killed = Frozen(), Frozen()
    straight.sam, straight.text_encoder = sam, text_encoder
    killed.sam, killed.text_encoder = _KilledSAM(sam, after=2), text_encoder
    alone = _config(world, tmp_path / "a", stage_source="teacher")
    train_adapters(alone, frozen=straight)
    resumed = _config(world, tmp_path / "b", stage_source="teacher")
    with pytest.raises(KeyboardInterrupt):
        train_adapters(resumed, frozen=killed)
    train_adapters(resumed, frozen=straight)
    a, b = load_file(str(alone.out / "adapters.safetensors")), load_file(str(resumed.out / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
