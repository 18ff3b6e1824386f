"""``llavaseg-bench reasonseg`` end to end with the ``tiny`` preset (random models: the plumbing, not scores).

Test doubles registered as extra routes (``monkeypatch`` on the route registry) wrap the real LLaVASeg route:
one counts the queries it is asked (resume), one raises on a chosen query (crash isolation), one chats with
a different "model" (dialogue agreement is measured, not assumed).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavaseg.bench.overlays import grid_size
from llavaseg.bench.records import BenchRecord
from llavaseg.cli.bench import main
from llavaseg.data.reasonseg import ReasonSegDataset, write_reasonseg_sample
from llavaseg.evaluate import QueryRecord
from llavaseg.routes.registry import ROUTES

CALLS: list[str] = []
BAD_QUERY = "the blue square on the right"


class CountingRoute:
    """Test double: the real LLaVASeg route, recording every query it is asked to segment."""

    def __init__(self, inner) -> None:
        self.inner, self.name = inner, "counting"

    def __call__(self, images, queries):
        CALLS.extend(queries)
        return self.inner(images, queries)

    def dialogue_model(self):
        return self.inner.dialogue_model()


class CrashingRoute(CountingRoute):
    """Test double: fails (raises) whenever its batch contains BAD_QUERY, like a route crashing on one sample."""

    def __call__(self, images, queries):
        if BAD_QUERY in queries:
            raise RuntimeError("simulated crash")
        return super().__call__(images, queries)


class _OtherChat:
    """Test double for a fine-tuned chat model whose answers drifted away from the base MLLM's."""

    def answer(self, images, questions):
        return ["zebra" for _ in questions]


class DriftedChatRoute(CountingRoute):
    def dialogue_model(self):
        return _OtherChat()


def build_counting(context):
    from llavaseg.routes.llavaseg import build

    return CountingRoute(build(context))


def build_crashing(context):
    from llavaseg.routes.llavaseg import build

    return CrashingRoute(build(context))


def build_drifted(context):
    from llavaseg.routes.llavaseg import build

    return DriftedChatRoute(build(context))


@pytest.fixture(scope="module", autouse=True)
def _fast(fast_tiny_models):
    """Every benchmark test here runs on the fast tiny models (see conftest)."""


@pytest.fixture(autouse=True)
def test_routes(monkeypatch):
    for name, fn in (("counting", "build_counting"), ("crashing", "build_crashing"), ("drifted", "build_drifted")):
        monkeypatch.setitem(ROUTES, name, f"{__name__}:{fn}")
    CALLS.clear()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, two_square_scene) -> Path:
    """4 images, 5 queries (image 1 has two texts), 2 short + 3 long; targets are the right-hand squares."""
    root = tmp_path_factory.mktemp("reasonseg")
    square = [[36, 20], [56, 20], [56, 40], [36, 40]]
    samples = [("img0", ["the blue square on the right"], True), ("img1", ["right square", "the big one"], False),
               ("img2", ["what would you sit on if it were a chair"], True), ("img3", ["the thing at right"], True)]
    for index, (name, texts, is_sentence) in enumerate(samples):
        write_reasonseg_sample(root / "val", name, Image.fromarray(two_square_scene(index)), texts, is_sentence,
                               [{"label": "target", "points": square}], image_format="png")
    rows = [{"image": f"img{i}", "question": q, "answer": a} for i in range(4)
            for q, a in (("what colour is the left square ?", "red"), ("how many squares are there ?", "two"))]
    (root / "val" / "dialogue.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _run(data_root, out, *extra: str) -> int:
    return main(["reasonseg", "--data", str(data_root), "--preset", "tiny", "--out", str(out), *extra])


def _records(path: Path) -> list[BenchRecord]:
    return [BenchRecord.model_validate_json(line) for line in path.read_text().splitlines()]


def test_end_to_end_files_and_values(data_root, tmp_path):
    out = tmp_path / "run"
    assert _run(data_root, out, "--limit", "4", "--routes", "llavaseg,llavaseg-noattr,drifted") == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"environment", "routes", "skipped_routes", "base_dialogue", "comparisons", "predictions"}
    env = results["environment"]
    assert env["preset"] == "tiny" and env["split"] == "val" and env["data"] == str(data_root.resolve())
    assert env["device"] == "cpu" and env["limit"] == 4 and {"torch", "transformers", "python"} <= set(env["versions"])
    assert list(results["routes"]) == ["llavaseg", "llavaseg-noattr", "drifted"]
    for name, summary in results["routes"].items():
        assert set(summary["metrics"]) == {"overall", "short", "long"}
        assert summary["metrics"]["overall"]["n_queries"] == 4 == summary["n_queries"]
        assert summary["metrics"]["short"]["n_queries"] == 2 and summary["metrics"]["long"]["n_queries"] == 2
        for split in summary["metrics"].values():
            assert 0.0 <= split["giou"] <= 1.0 and 0.0 <= split["ciou"] <= 1.0
        assert summary["seconds_per_query"] > 0 and summary["peak_rss_mb"] > 10 and summary["cuda_peak_mb"] is None
        # the summary is exactly what the per-query lines say (gIoU = mean IoU, cIoU = sum I / sum U)
        records = _records(out / f"queries-{name}.jsonl")
        assert [r.query_id for r in records] == ["val/img0#0", "val/img1#0", "val/img1#1", "val/img2#0"]
        assert summary["metrics"]["overall"]["giou"] == pytest.approx(np.mean([r.iou for r in records]))
        total_i, total_u = sum(r.intersection for r in records), sum(r.union for r in records)
        assert summary["metrics"]["overall"]["ciou"] == pytest.approx(total_i / total_u)
        assert all(r.mask is not None and r.predicted_mask().shape == (48, 64) and r.error is None for r in records)
        assert all(r.answer and r.description for r in records)
    # dialogue: limit 4 -> the 8 questions of the first 4 images; agreement is measured against the base
    frozen = results["routes"]["llavaseg"]["dialogue"]
    assert frozen["n_items"] == 8 and frozen["n_compared"] == 8
    assert frozen["agreement_em"] == 1.0 and frozen["agreement_f1"] == 1.0  # the same frozen model
    assert results["routes"]["llavaseg-noattr"]["dialogue"]["agreement_em"] == 1.0
    drifted = results["routes"]["drifted"]["dialogue"]
    base_answers = [json.loads(line)["answer"] for line in (out / "dialogue-base.jsonl").read_text().splitlines()]
    assert len(base_answers) == 8 and all(a != "zebra" for a in base_answers)
    assert drifted["agreement_em"] == 0.0 and drifted["agreement_f1"] == 0.0
    assert results["base_dialogue"]["n_items"] == 8 and 0.0 <= results["base_dialogue"]["reference_f1"] <= 1.0
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["route"] for r in rows] == ["llavaseg", "llavaseg-noattr", "drifted"]
    assert float(rows[0]["overall_giou"]) == pytest.approx(results["routes"]["llavaseg"]["metrics"]["overall"]["giou"])
    assert rows[0]["dialogue_agreement_em"] == "1.0" and rows[2]["dialogue_agreement_em"] == "0.0"
    with Image.open(out / "overlays.png") as grid:
        assert grid.size == grid_size(4, 4)  # 4 queries; ground truth + 3 routes
    assert json.loads((out / "run.json").read_text())["routes"] == ["llavaseg", "llavaseg-noattr", "drifted"]


def test_resume_runs_only_new_queries_and_matches_an_uninterrupted_run(data_root, tmp_path):
    resumed, single = tmp_path / "resumed", tmp_path / "single"
    args = ("--routes", "counting", "--no-dialogue")
    assert _run(data_root, resumed, "--limit", "2", *args) == 0
    assert CALLS == ["the blue square on the right", "right square"]
    CALLS.clear()
    assert _run(data_root, resumed, "--limit", "4", *args) == 0
    assert CALLS == ["the big one", "what would you sit on if it were a chair"]  # only the 2 new queries
    CALLS.clear()
    assert _run(data_root, single, "--limit", "4", *args) == 0
    assert len(CALLS) == 4
    a = json.loads((resumed / "results.json").read_text())["routes"]["counting"]
    b = json.loads((single / "results.json").read_text())["routes"]["counting"]
    assert a["n_resumed"] == 2 and b["n_resumed"] == 0
    for split in ("overall", "short", "long"):
        for key in ("giou", "ciou", "n_queries", "n_errors"):
            assert a["metrics"][split][key] == pytest.approx(b["metrics"][split][key], abs=1e-12)
    assert [r.iou for r in _records(resumed / "queries-counting.jsonl")] == pytest.approx(
        [r.iou for r in _records(single / "queries-counting.jsonl")], abs=1e-12)
    CALLS.clear()
    assert _run(data_root, resumed, "--limit", "2", *args) == 0  # a smaller selection is summarised alone
    assert CALLS == []
    assert json.loads((resumed / "results.json").read_text())["routes"]["counting"]["n_queries"] == 2


def test_a_truncated_last_line_is_recomputed(data_root, tmp_path):
    out = tmp_path / "run"
    args = ("--routes", "counting", "--no-dialogue", "--limit", "4")
    assert _run(data_root, out, *args) == 0
    before = json.loads((out / "results.json").read_text())["routes"]["counting"]["metrics"]
    path = out / "queries-counting.jsonl"
    text = path.read_text()
    last_start = text.rstrip("\n").rfind("\n") + 1
    path.write_text(text[: last_start + (len(text) - last_start) // 2])  # killed halfway through the last line
    CALLS.clear()
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert _run(data_root, out, *args) == 0
    assert CALLS == ["what would you sit on if it were a chair"]
    assert [r.query_id for r in _records(path)] == ["val/img0#0", "val/img1#0", "val/img1#1", "val/img2#0"]
    after = json.loads((out / "results.json").read_text())["routes"]["counting"]["metrics"]
    assert after["overall"]["giou"] == pytest.approx(before["overall"]["giou"], abs=1e-12)


def test_a_route_crashing_on_one_query_records_one_error(data_root, tmp_path):
    out = tmp_path / "run"
    # batches of 2 by image: [img0#0] [img1#0, img1#1] [img2#0, img3#0]; the first one crashes
    assert _run(data_root, out, "--routes", "crashing", "--no-dialogue", "--batch-size", "2") == 0
    records = _records(out / "queries-crashing.jsonl")
    assert len(records) == 5
    bad = [r for r in records if r.text == BAD_QUERY]
    assert len(bad) == 1 and bad[0].error == "RuntimeError: simulated crash"
    # evaluator's rule: IoU 0, intersection 0, union = ground-truth area (the 21x21 square drawn by LISA's rule)
    assert bad[0].iou == 0.0 and bad[0].intersection == 0 and bad[0].union == 21 * 21 and bad[0].mask is None
    good = [r for r in records if r.text != BAD_QUERY]
    assert len(CALLS) == 4 and all(r.error is None for r in good)
    queries = {q.query_id: q for q in ReasonSegDataset(data_root, "val").queries()}
    for record in good:  # the others were scored from their own masks
        expected = QueryRecord.from_masks(record.predicted_mask(), queries[record.query_id].load_mask(),
                                          query_id=record.query_id, is_sentence=record.is_sentence)
        assert (record.intersection, record.union) == (expected.intersection, expected.union)
    summary = json.loads((out / "results.json").read_text())["routes"]["crashing"]
    assert summary["n_errors"] == 1 and summary["metrics"]["overall"]["n_errors"] == 1
    assert summary["metrics"]["overall"]["giou"] == pytest.approx(sum(r.iou for r in good) / 5)


def test_a_different_configuration_is_refused(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(data_root, out, "--routes", "llavaseg", "--no-dialogue", "--limit", "1") == 0
    capsys.readouterr()
    assert _run(data_root, out, "--routes", "llavaseg", "--no-dialogue", "--limit", "1", "--first-text-only") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "first_text_only: False -> True" in err[0] and "new --out" in err[0]
    assert _run(data_root, out, "--routes", "llavaseg", "--limit", "1") == 2  # dialogue on now: another run
    assert "dialogue: None ->" in capsys.readouterr().err


def test_routes_that_cannot_be_built_are_skipped(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr("llavaseg.routes.registry.ROUTES", {"llavaseg": ROUTES["llavaseg"],
                                                             "future-route": "llavaseg.routes.not_written_yet:build"})
    out = tmp_path / "run"
    assert _run(data_root, out, "--no-dialogue", "--limit", "1") == 0  # default: every registered route
    results = json.loads((out / "results.json").read_text())
    assert list(results["routes"]) == ["llavaseg"]
    assert "not available" in results["skipped_routes"]["future-route"]


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "tiny", "--routes", "llavaseg,nope"], "unknown route 'nope'"),
    (["--preset", "tiny", "--data", "/does/not/exist"], "does not exist"),
    (["--preset", "tiny", "--limit", "0"], "--limit must be at least 1"),
    (["--preset", "tiny", "--device", "cuda:0"], "CUDA is not available"),
])
def test_user_errors_are_one_line_with_status_2(argv, message, capsys, tmp_path):
    if "--data" not in argv:
        argv = [*argv, "--data", str(tmp_path)]
    assert main(["reasonseg", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llavaseg-bench: error: ") and message in err[0]


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "reasonseg" in out and "refcoco" in out
