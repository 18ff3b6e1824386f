"""Linear probe: can the referent's location be read from the hidden state that predicts ``[SEG]``?

    python benchmarks/seg_probe.py [--models untrained,pkg:weights/tinyworld/seg_token,...] [--limit N]

Why: a single-token ``[SEG]`` model can only segment the right object if the one hidden state that predicts
``[SEG]`` already identifies it. On the tiny world the query names the referent indirectly ("the circle that
has the same colour as the square"), so this measures whether the fine-tuned LLM resolved the reference by the
time it emits the token, before and after training, instead of asserting it.

For each ``[SEG]`` model (``untrained`` = the base MLLM with LoRA at init and an untrained projection, i.e.
*before* training; then the shipped models, *after*): the state is taken the way the model is evaluated:
teacher-forced LISA answer for ``lisa`` models, the state after the model's own generated attributes for
``attributes-first`` ones. A multinomial logistic regression (torch, L2, full-batch L-BFGS) is fitted on
tiny-world train states to the ground-truth ``location`` attribute and scored on val (all texts), on the
data set's queries and on their explicit twins (``the large red circle in the left``). Chance = the majority
location's share. Writes ``benchmarks/results/seg_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from llavaseg.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results" / "seg_probe.json"


def _queries(root: Path, split: str, limit: int | None):
    from llavaseg.data.annotations import GroundTruthStages
    from llavaseg.data.reasonseg import ReasonSegDataset

    dataset = ReasonSegDataset(root, split)
    stages = GroundTruthStages.for_dataset(dataset)
    rows = [(query, stages.lookup(query).attributes) for query in dataset.queries()]
    return rows[:limit] if limit else rows


def _model(source: str, mllm, sam):
    from llavaseg.models.sources import parse_source
    from llavaseg.seg_token.checkpoint import load_seg_token_model
    from llavaseg.seg_token.model import create_seg_token_model

    if source == "untrained":
        return create_seg_token_model(mllm, sam, templates="tiny-world")
    return load_seg_token_model(parse_source(source).path(), mllm, sam)


@torch.inference_mode()
def seg_states(model, rows, explicit: bool, batch: int = 16) -> np.ndarray:
    """One state per query (zeros when an attributes-first model emitted no ``[SEG]``)."""
    from llavaseg.recipes.train_seg_token import explicit_query
    from llavaseg.seg_token.inference import generate_pass, request_text, teacher_forced_pass

    states = []
    for start in range(0, len(rows), batch):
        chunk = rows[start: start + batch]
        images = [query.load_image() for query, _ in chunk]
        texts = [request_text(explicit_query(attrs) if explicit else query.text,
                              "short" if explicit or not query.is_sentence else "long", model.templates)
                 for query, attrs in chunk]
        if model.config.answer_style == "lisa":
            passes = teacher_forced_pass(model, images, texts)
        else:
            passes = generate_pass(model, images, texts, max_new_tokens=48)
        for seg in passes:
            hidden = seg.hidden[-1] if seg.hidden.shape[0] else torch.zeros(model.config.hidden_size)
            states.append(hidden.float().cpu().numpy())
    return np.stack(states)


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, classes: int, l2: float = 1e-2) -> np.ndarray:
    """Predicted classes of a standardised multinomial logistic regression fitted on ``train_x``."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.tensor((train_x - mean) / std, dtype=torch.float64)
    y = torch.tensor(train_y)
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + l2 * (weight ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    test = torch.tensor((test_x - mean) / std, dtype=torch.float64)
    return (test @ weight + bias).argmax(1).numpy()


def main(argv: list[str] | None = None) -> int:
    from llavaseg.models.components import build_mllm, build_sam
    from llavaseg.models.presets import get_preset
    from llavaseg.tinyworld.generate import default_tinyworld_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="untrained,pkg:weights/tinyworld/seg_token,"
                                            "pkg:weights/tinyworld/seg_token_cot")
    parser.add_argument("--limit", type=int, default=None, help="queries per split (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = get_preset("tiny-world")
    mllm, sam = build_mllm(preset.mllm, device="cpu", dtype=None), build_sam(preset.sam, device="cpu")
    root = default_tinyworld_root()
    train, val = _queries(root, "train", args.limit), _queries(root, "val", args.limit)
    names = sorted({attrs["location"] for _, attrs in train + val})
    train_y = np.array([names.index(attrs["location"]) for _, attrs in train])
    val_y = np.array([names.index(attrs["location"]) for _, attrs in val])
    report = {"task": "referent location from the [SEG]-predicting state", "classes": names,
              "chance": float(np.bincount(val_y).max() / len(val_y)), "n_train": len(train), "n_val": len(val),
              "models": {}}
    for source in [s for s in args.models.split(",") if s]:
        started = time.perf_counter()
        model = _model(source, mllm, sam).eval()
        row = {"answer_style": model.config.answer_style, "trained_steps": model.config.trained_steps}
        for explicit in (False, True):
            guess = probe(seg_states(model, train, explicit), train_y, seg_states(model, val, explicit), len(names))
            row["explicit_queries" if explicit else "dataset_queries"] = float((guess == val_y).mean())
        row["seconds"] = round(time.perf_counter() - started, 1)
        report["models"][source] = row
        print(f"{source:45s} dataset queries {row['dataset_queries']:.3f}  explicit {row['explicit_queries']:.3f}"
              f"  ({row['answer_style']}, {row['trained_steps']} steps)", file=sys.stderr)
    print(f"chance (majority location) {report['chance']:.3f}", file=sys.stderr)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
