"""Hard negatives for the tiny MLLM's region stage, mined from a model's own stage-2 slips.

Why: the ``llavaseg-verify`` check is asked by the same model whose stage 2 slipped, and it said "yes" to most
of those slips (mean P(yes) 0.70 on wrong first candidates, ``docs/tinyworld.md``): the region stage's
negatives were objects the *data generator* finds confusable (same shape), not the ones *this model* confuses.
Here a trained model answers both stages greedily on fresh train-stream scenes (far past any scene the recipe or
the benchmark's train split uses); where its attributes point to another object than the query's target, that
(scene, query, object) is a mined confusion, and the region stage shows it highlighted with the answer "no",
next to the target with "yes". Hard-negative mining as detectors are trained; nothing here reads val or test.

The pool is written once per (model, prompts, scenes) to ``mined.json`` in the run's work folder and re-read
on resume only when that key matches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from llavaseg.atomic import atomic_write_text
from llavaseg.attributes import parse_attributes
from llavaseg.method.stages import run_stages
from llavaseg.prompting import PromptSet
from llavaseg.tinyworld.scenes import Scene

__all__ = ["MinedConfusion", "pointed_object", "mine_confusions", "mined_pool"]


class MinedConfusion(BaseModel):
    """Scene ``scene`` of the train stream, its query ``query``, and the object ``wrong`` a model named instead."""

    scene: int
    query: int
    wrong: int


def pointed_object(scene: Scene, attributes: dict[str, str]) -> int | None:
    """The object a stage-2 answer describes: the one matching most of its attribute values, location first
    among equals (it is what the adapters follow most); ``None`` when two objects tie or nothing matches."""
    def score(index: int) -> tuple[int, int]:
        values = scene.objects[index].attributes()
        return (sum(values.get(key) == value for key, value in attributes.items()),
                int(values.get("location") == attributes.get("location")))

    scores = [score(index) for index in range(len(scene.objects))]
    best = max(scores, default=(0, 0))
    if best[0] == 0 or scores.count(best) > 1:
        return None
    return scores.index(best)


def mine_confusions(mllm: Any, prompts: PromptSet, data_seed: int, start: int, count: int,
                    batch_size: int = 32) -> tuple[list[MinedConfusion], int]:
    """Both stages, greedy, on every query of train-stream scenes ``start .. start+count-1``; returns the
    confusions and how many queries were asked."""
    from llavaseg.tinyworld.generate import iter_scenes

    asked: list[tuple[int, int, Scene, np.ndarray, str, int]] = []
    for offset, (scene, image, queries, _) in enumerate(iter_scenes("train", data_seed, count, start=start)):
        array = np.asarray(image)
        for number, query in enumerate(queries):
            asked.append((start + offset, number, scene, array, query.text, query.target_index))
    mined = []
    for first in range(0, len(asked), batch_size):
        chunk = asked[first: first + batch_size]
        outputs = run_stages(mllm, prompts, [row[3] for row in chunk], [row[4] for row in chunk])
        for (index, number, scene, _, _, target), output in zip(chunk, outputs):
            named = pointed_object(scene, dict(parse_attributes(output.attributes_output).attributes.items()))
            if named is not None and named != target:
                mined.append(MinedConfusion(scene=index, query=number, wrong=named))
    return mined, len(asked)


def mined_pool(work_dir: Path, mllm: Any, model_digest: str, prompts: PromptSet, data_seed: int, start: int,
               count: int, log: Any = print) -> list[MinedConfusion]:
    """The mined confusions of this model on these scenes: read from ``work_dir/mined.json`` when its key
    matches, else mined now and written atomically (a mismatching file is replaced, never reused)."""
    key = {"model": model_digest, "prompts": hashlib.sha256(
        json.dumps({s: t.text for s, t in sorted(prompts.templates.items())}).encode()).hexdigest()[:16],
        "data_seed": data_seed, "start": start, "count": count}
    path = work_dir / "mined.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return [MinedConfusion.model_validate(row) for row in saved["confusions"]]
        log(f"{path} was mined for {saved.get('key')}, not {key}: mining again")
    mined, asked = mine_confusions(mllm, prompts, data_seed, start, count)
    log(f"mined {len(mined)} confusions from {asked} queries on {count} scenes")
    atomic_write_text(path, json.dumps({"key": key, "asked": asked,
                                        "confusions": [row.model_dump() for row in mined]}) + "\n")
    return mined
