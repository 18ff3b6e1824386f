"""Tiny-world generator: determinism, unique queries, exact masks, distractors, ReasonSeg compatibility."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest

from llavaseg.data.reasonseg import ReasonSegDataset, polygons_to_mask
from llavaseg.errors import InputError
from llavaseg.tinyworld import generate as gen
from llavaseg.tinyworld.generate import generate_tinyworld, iter_scenes, main, scene_rng
from llavaseg.tinyworld.queries import (
    SENTENCE_FAMILIES,
    SHORT_FAMILIES,
    QueryError,
    make_dialogue,
    make_target_queries,
    resolve_query,
)
from llavaseg.tinyworld.scenes import (
    Scene,
    SceneObject,
    full_mask,
    object_masks,
    render_scene_array,
    sample_scene,
    shape_polygon,
)
from llavaseg.tinyworld.vocab import LOCATION_GRID, VOCAB

SMALL = {"train": 6, "val": 3, "test": 3}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def _tree(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*"))


def _scenes(n: int, split: str = "train") -> list:
    return list(iter_scenes(split, seed=0, count=n))


def test_generation_is_byte_identical_and_matches_iter_scenes(tmp_path: Path) -> None:
    a = generate_tinyworld(tmp_path / "a", seed=3, sizes=SMALL)
    b = generate_tinyworld(tmp_path / "b", seed=3, sizes=SMALL)
    assert _tree(a) == _tree(b)
    files = [p for p in _tree(a) if (a / p).is_file()]
    assert len(files) == 2 * sum(SMALL.values()) + 2 * len(SMALL) + 1
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(p) for p in files], shallow=False)
    assert mismatch == [] and errors == []
    # the in-memory stream reproduces the files
    for i, (scene, image, queries, _) in enumerate(iter_scenes("val", seed=3, count=3)):
        data = json.loads((a / "val" / f"val_{i:05d}.json").read_text())
        assert data["text"] == [q.text for q in queries]
        from PIL import Image

        with Image.open(a / "val" / f"val_{i:05d}.png") as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(image))
    meta = json.loads((a / "meta.json").read_text())
    assert meta == {"generator": gen.GENERATOR_VERSION, "seed": 3, "sizes": SMALL}


def test_splits_and_seeds_are_independent() -> None:
    first = lambda split, seed: sample_scene(scene_rng(split, seed, 0))  # noqa: E731
    assert first("train", 0) == first("train", 0)
    assert first("train", 0) != first("val", 0)
    assert first("val", 0) != first("test", 0)
    assert first("train", 0) != first("train", 1)


def test_every_query_identifies_its_target_uniquely() -> None:
    fams: set[str] = set()
    for scene, _, queries, _ in _scenes(300):
        assert 1 <= len(queries) <= 3
        assert len({q.is_sentence for q in queries}) == 1
        assert len({q.text for q in queries}) == len(queries)
        for q in queries:
            assert resolve_query(scene, q.text) == [q.target_index] == [scene.focus_index]
            target = scene.objects[q.target_index]
            assert q.description == target.shape
            assert q.attributes == {"color": target.color, "location": target.location, "size": target.size,
                                    "shape": target.shape}
            assert q.is_sentence == (q.family in SENTENCE_FAMILIES)
            assert set(q.text.split()) <= set(VOCAB)
            fams.add(q.family)
    assert fams == set(SHORT_FAMILIES) | set(SENTENCE_FAMILIES)


def _obj(shape: str, color: str, size: str, cell: tuple[int, int]) -> SceneObject:
    row, col = cell
    cx, cy = 21 + 43 * col, 21 + 43 * row
    r = 8.0 if size == "small" else 15.0
    return SceneObject(shape=shape, color=color, size=size, cell=cell, location=LOCATION_GRID[row][col],
                       center=(cx, cy), radius=r, rgb=(0, 0, 0), polygon=shape_polygon(shape, cx, cy, r),
                       bbox=(0, 0, 1, 1))


def test_interpreter_on_a_hand_made_scene() -> None:
    """The uniqueness checks above rely on resolve_query, so check its semantics against known answers."""
    objs = [
        _obj("circle", "red", "small", (0, 0)),    # 0 top left
        _obj("circle", "blue", "large", (0, 2)),   # 1 top right
        _obj("square", "red", "large", (1, 1)),    # 2 center
        _obj("circle", "red", "large", (2, 2)),    # 3 bottom right
        _obj("diamond", "green", "small", (0, 1)),  # 4 top
    ]
    scene = Scene(background=(230, 230, 230), texture_seed=0, objects=objs, focus_index=0)
    cases = {
        "the circle": [0, 1, 3],
        "the blue shape": [1],
        "the only blue shape": [1],
        "the only red shape": [],
        "the smallest circle": [0],
        "the largest red shape": [2, 3],
        "the smallest diamond": [],  # no contrast among diamonds
        "the circle in the top left": [0],
        "the shape in the bottom left": [],
        "the circle that is not red": [1],
        "the red shape that is not a circle": [2],
        "the shape that has the same colour as the square": [0, 3],
        "the circle that has the same colour as the shape in the center": [0, 3],
        "the shape that has the same shape as the blue shape": [0, 3],
        "the shape to the right of the small red circle": [1, 4],
        "the shape to the left of the blue circle": [0, 4],
        "the shape below the blue circle": [3],
        "the shape above the square": [4],
        "the circle whose colour is the one most shapes share": [0, 3],
        "the shape between the red circle in the top left and the large red circle": [2],
        "the shape between the circle in the top left and the blue circle": [4],
        "the shape between the red circle and the blue circle": [],  # "the red circle" is ambiguous
    }
    for text, want in cases.items():
        assert resolve_query(scene, text) == want, text
    for bad in ("a circle", "the red", "the circle on the left", "the circle that has the same name as the square"):
        with pytest.raises(QueryError):
            resolve_query(scene, bad)


def test_masks_are_visible_regions_and_match_reasonseg_polygons() -> None:
    for scene, image, queries, _ in _scenes(150, "val"):
        masks = object_masks(scene)
        assert masks.shape == (len(scene.objects), 128, 128)
        assert not (masks.sum(axis=0) > 1).any()  # visible masks are disjoint
        for obj, m in zip(scene.objects, masks, strict=True):
            full = full_mask(obj.polygon)
            assert m.any() and (m <= full).all()
            assert m.sum() >= 0.5 * full.sum()
        t = queries[0].target_index
        drawn = polygons_to_mask([{"label": "target", "points": scene.objects[t].polygon}], 128, 128) == 1
        assert _iou(drawn, masks[t]) >= 0.95
        assert np.array_equal(drawn, masks[t])  # exact: the target is never occluded
        # every visible pixel of an object is painted in its colour (up to the mild pixel noise)
        arr = np.asarray(image).astype(int)
        for obj, m in zip(scene.objects, masks, strict=True):
            assert np.abs(arr[m] - np.asarray(obj.rgb)).max() <= 8


def test_distractor_rule_holds_in_most_scenes() -> None:
    scenes = [s for s, *_ in _scenes(300)]
    same_shape = [any(o.shape == s.focus.shape and o.color != s.focus.color for o in s.objects) for s in scenes]
    assert np.mean(same_shape) >= 0.7
    name_ambiguous = [sum(o.shape == s.focus.shape for o in s.objects) > 1 for s in scenes]
    assert np.mean(name_ambiguous) >= 0.7
    assert all(3 <= len(s.objects) <= 5 and len({o.cell for o in s.objects}) == len(s.objects) for s in scenes)


def test_dialogue_answers_are_exact() -> None:
    number = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
    kinds = set()
    for scene, _, _, dialogue in _scenes(200):
        assert 1 <= len(dialogue) <= 5
        objs = scene.objects
        by_loc = {o.location: o for o in objs}
        for item in dialogue:
            q, a = item.question, item.answer
            assert set(q.split()) | set(a.split()) <= set(VOCAB)
            w = q.split()
            if q.startswith("how many") and w[3] == "shapes":
                kinds.add("count colour")
                assert number[a] == sum(o.color == w[2] for o in objs)
            elif q.startswith("how many"):
                kinds.add("count")
                assert number[a] == sum(o.shape + "s" == w[2] for o in objs)
            elif q.startswith("what colour is the shape in the "):
                kinds.add("colour")
                assert a == by_loc[q[len("what colour is the shape in the "):-2]].color
            elif q.startswith("what shape is in the "):
                kinds.add("shape")
                assert a == by_loc[q[len("what shape is in the "):-2]].shape
            elif q.startswith("is there"):
                kinds.add("exists")
                c, s = w[-3], w[-2]
                assert a == ("yes" if any(o.color == c and o.shape == s for o in objs) else "no")
            elif q.startswith("what is "):
                kinds.add("relation")
                hits = resolve_query(scene, "the shape " + q[len("what is "):-2])
                assert len(hits) <= 1
                if hits:
                    o = objs[hits[0]]
                    assert a == f"{'an' if o.color == 'orange' else 'a'} {o.color} {o.shape}"
                else:
                    assert a == "nothing"
            elif q.startswith("where is"):
                kinds.add("where")
                assert a in {o.location for o in objs if o.color == w[3] and o.shape == w[4]}
            elif q.startswith("what size"):
                kinds.add("size")
                assert a in {o.size for o in objs if o.color == w[4] and o.shape == w[5]}
            else:
                raise AssertionError(q)
    assert kinds == {"count", "count colour", "colour", "shape", "exists", "relation", "where", "size"}


def test_files_load_with_reasonseg_dataset(tmp_path: Path) -> None:
    root = generate_tinyworld(tmp_path / "tw", seed=0, sizes=SMALL)
    for split, n in SMALL.items():
        ds = ReasonSegDataset(root, split)
        assert len(ds) == n
        stages = [json.loads(x) for x in (root / split / "stages.jsonl").read_text().splitlines()]
        queries = list(ds.queries())
        assert [(q.sample.name, q.text_index, q.text) for q in queries] == [
            (s["image"], s["text_index"], s["text"]) for s in stages
        ]
        assert set(stages[0]) >= {"image", "text_index", "text", "is_sentence", "description", "attributes"}
        dialogue = [json.loads(x) for x in (root / split / "dialogue.jsonl").read_text().splitlines()]
        assert {d["image"] for d in dialogue} == {s.name for s in ds}
        for sample, (scene, *_rest) in zip(ds, iter_scenes(split, 0, n), strict=True):
            assert sample.image_path.suffix == ".png"
            assert np.array_equal(sample.load_image(), render_scene_array(scene))
            assert np.array_equal(sample.load_mask() == 1, object_masks(scene)[scene.focus_index])


def test_overwrite_rules_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(InputError):
        generate_tinyworld(other, sizes=SMALL)
    assert (other / "precious.txt").read_text() == "keep me"
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--seed", "1", "--train", "2", "--val", "1", "--test", "1"]) == 0
    assert len(list((out / "train").glob("*.png"))) == 2
    generate_tinyworld(out, seed=1, sizes={"train": 1, "val": 1, "test": 1})  # replacing a tiny world is fine
    assert len(list((out / "train").glob("*.png"))) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_default_root_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAVASEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gen, "DEFAULT_SIZES", {"train": 2, "val": 1, "test": 1})
    root = gen.default_tinyworld_root()
    assert root == tmp_path / "cache" / "tinyworld-v1-seed0"
    stamp = (root / "meta.json").stat().st_mtime_ns
    assert gen.default_tinyworld_root() == root
    assert (root / "meta.json").stat().st_mtime_ns == stamp
    assert len(ReasonSegDataset(root, "val")) == 1


def test_select_split_is_train_stream_scenes_no_recipe_draws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``select`` = train-stream scenes from SELECT_START on, in a cache folder of its own (the default one is
    untouched), named ``select_*``; the recipes draw train-stream scenes from index 0."""
    monkeypatch.setenv("LLAVASEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gen, "SELECT_SIZE", 2)
    root = gen.selection_tinyworld_root()
    assert root == tmp_path / "cache" / "tinyworld-v1-seed0-select"
    assert not (tmp_path / "cache" / "tinyworld-v1-seed0").exists()
    assert sorted(p.name for p in (root / "select").glob("*.png")) == ["select_00000.png", "select_00001.png"]
    written = ReasonSegDataset(root, "select")
    expected = list(gen.iter_scenes("train", 0, 2, start=gen.SELECT_START))
    assert [s.texts for s in written] == [[q.text for q in queries] for _, _, queries, _ in expected]
    first_train = next(gen.iter_scenes("train", 0, 1))[0]
    assert next(gen.iter_scenes("select", 0, 1))[0] == expected[0][0] != first_train
    assert gen.default_tiny_world_source("select").path == root
    second = gen.selection_tinyworld_root("select2")  # a fresh selection set once "select" has been chosen on
    assert second == tmp_path / "cache" / "tinyworld-v1-seed0-select2"
    assert next(gen.iter_scenes("select2", 0, 1))[0] == next(gen.iter_scenes("train", 0, 1, start=3_000_000))[0]
    assert [s.texts for s in ReasonSegDataset(second, "select2")] != [s.texts for s in written]
    with pytest.raises(InputError, match="unknown selection split 'val'"):
        gen.selection_tinyworld_root("val")
    with pytest.raises(InputError, match="cannot write tiny-world split 'sam'"):
        gen.generate_tinyworld(tmp_path / "x", sizes={"sam": 1})


def test_make_functions_are_deterministic() -> None:
    scene = sample_scene(np.random.default_rng(5))
    a = make_target_queries(scene, np.random.default_rng(1)), make_dialogue(scene, np.random.default_rng(1))
    b = make_target_queries(scene, np.random.default_rng(1)), make_dialogue(scene, np.random.default_rng(1))
    assert a == b
