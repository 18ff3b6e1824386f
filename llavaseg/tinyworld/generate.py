"""Write the tiny world to disk in ReasonSeg format (plus stage and dialogue annotations), deterministically.

Layout written under ``out_root``::

    meta.json                       seed, sizes, generator version
    {train,val,test}/<name>.png     128x128 RGB scene (PNG: exact colours, byte-identical across runs)
    {train,val,test}/<name>.json    ReasonSeg/LabelMe annotation: texts, is_sentence, one "target" polygon
    {train,val,test}/stages.jsonl   per (image, text): description + attributes the MLLM stage should produce
    {train,val,test}/dialogue.jsonl per image: ordinary questions with short exact answers

The selection splits ``select``, ``select2``, ``select3`` and ``select4`` are written on their own
(:func:`selection_tinyworld_root`): train-stream scenes from :data:`SELECTION_STARTS` on. Every recipe draws
train-stream scenes from low indices (the ``train`` split is the first 400), so a choice that involves a shipped
model (which MLLM to ship, a route's settings) is measured on a selection split: scenes of the train distribution
that no recipe trained on. Once a choice has been made on one, the next choice takes a fresh one (``select``
chose MLLM C and its verify rule, ``select2`` MLLM D, ``select3`` MLLM E, ``select4`` kept the rule for E;
the record is in ``docs/tinyworld.md``).

Every scene has its own random generator seeded by ``(seed, split, index)``: splits never share scenes,
scene ``i`` does not depend on how many scenes come before it, and :func:`iter_scenes` reproduces exactly
what was written without touching disk. Targets are never occluded (see :mod:`llavaseg.tinyworld.scenes`),
so the ``target`` polygon is the exact visible outline and no ``ignore`` polygons are needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from llavaseg.data.annotations import (
    DIALOGUE_FILE,
    STAGES_FILE,
    DialogueRecord,
    StageRecord,
    write_records,
)
from llavaseg.data.reasonseg import write_reasonseg_sample
from llavaseg.data.registry import DataSource
from llavaseg.errors import InputError
from llavaseg.paths import cache_dir
from llavaseg.tinyworld.queries import (
    DialogueItem,
    TargetQuery,
    make_dialogue,
    make_target_queries,
)
from llavaseg.tinyworld.scenes import Scene, render_scene, sample_scene

__all__ = [
    "GENERATOR_VERSION",
    "DEFAULT_SIZES",
    "SELECT_START",
    "SELECTION_STARTS",
    "SELECT_SIZE",
    "SPLIT_CODES",
    "scene_rng",
    "scene_name",
    "iter_scenes",
    "generate_tinyworld",
    "default_tinyworld_root",
    "selection_tinyworld_root",
    "default_tiny_world_source",
    "main",
]

GENERATOR_VERSION = "tinyworld-v1"
"""Changes whenever the same seed would produce different files (then the default cache name changes too)."""

DEFAULT_SIZES: dict[str, int] = {"train": 400, "val": 100, "test": 100}

SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "test": 2, "sam": 3}
"""Seed-stream id of each split. ``sam`` is an endless stream for pretraining the tiny SAM, disjoint from all."""

SELECTION_STARTS: dict[str, int] = {"select": 2_000_000, "select2": 3_000_000, "select3": 4_000_000,
                                     "select4": 5_000_000}
"""First train-stream scene of each selection split: past every recipe's draws (tune and region steps x scenes,
region continuations from ``region_start`` up to a few hundred thousand, mined pools from 1,000,000 up to a
few thousand), below the align pools (from 10,000,000)."""
SELECT_START = SELECTION_STARTS["select"]
SELECT_SIZE = 400
WRITABLE_SPLITS = ("train", "val", "test", *SELECTION_STARTS)


def scene_rng(split: str, seed: int, index: int) -> np.random.Generator:
    """The generator for scene ``index`` of ``split``: independent streams per (seed, split, index)."""
    if split not in SPLIT_CODES:
        raise InputError(f"unknown tiny-world split {split!r}; expected one of {sorted(SPLIT_CODES)}")
    if seed < 0 or index < 0:
        raise InputError(f"seed and index must be non-negative, got seed={seed} index={index}")
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def scene_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


def iter_scenes(
    split: str, seed: int = 0, count: int | None = None, start: int = 0
) -> Iterator[tuple[Scene, Image.Image, list[TargetQuery], list[DialogueItem]]]:
    """Yield ``(scene, image, target_queries, dialogue)`` for scenes ``start .. start+count-1`` of a split.

    ``count=None`` means the split's default size (``DEFAULT_SIZES``), or an endless stream for ``"sam"``.
    The output equals what :func:`generate_tinyworld` writes for the same seed, image for image.
    """
    if count is None:
        count = SELECT_SIZE if split in SELECTION_STARTS else DEFAULT_SIZES.get(split)
    stream, offset = ("train", SELECTION_STARTS[split]) if split in SELECTION_STARTS else (split, 0)
    index = start
    while count is None or index < start + count:
        rng = scene_rng(stream, seed, offset + index)
        scene = sample_scene(rng)
        queries = make_target_queries(scene, rng)
        dialogue = make_dialogue(scene, rng)
        yield scene, render_scene(scene), queries, dialogue
        index += 1


def _write_split(split_dir: Path, split: str, seed: int, count: int) -> None:
    stages: list[StageRecord] = []
    dialogue: list[DialogueRecord] = []
    for i, (scene, image, queries, items) in enumerate(iter_scenes(split, seed, count)):
        name = scene_name(split, i)
        target = scene.objects[queries[0].target_index]
        shapes = [{"label": "target", "points": target.polygon}]
        write_reasonseg_sample(
            split_dir, name, image, [q.text for q in queries], queries[0].is_sentence, shapes, image_format="png"
        )
        for j, q in enumerate(queries):
            stages.append(StageRecord(image=name, text_index=j, text=q.text, is_sentence=q.is_sentence,
                                      description=q.description, attributes=q.attributes, family=q.family))
        dialogue += [DialogueRecord(image=name, question=d.question, answer=d.answer) for d in items]
    write_records(split_dir / STAGES_FILE, stages)
    write_records(split_dir / DIALOGUE_FILE, dialogue)


def _is_tinyworld(path: Path) -> bool:
    meta = path / "meta.json"
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("generator", "").startswith("tinyworld")
    except (OSError, ValueError, AttributeError):
        return False


def generate_tinyworld(out_root: Path | str, seed: int = 0, sizes: Mapping[str, int] | None = None) -> Path:
    """Generate the data set into ``out_root`` and return it; same seed and sizes give byte-identical files.

    The whole tree is built in a temporary sibling directory and renamed into place, so readers never see
    a half-written data set. An existing ``out_root`` is replaced only if it is empty or a previous tiny
    world (it has our ``meta.json``); anything else raises :class:`InputError` rather than deleting it.
    """
    out_root = Path(out_root).expanduser().absolute()
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    for split, n in sizes.items():
        if split not in WRITABLE_SPLITS:
            raise InputError(f"cannot write tiny-world split {split!r}; expected one of {', '.join(WRITABLE_SPLITS)}")
        if n < 1:
            raise InputError(f"split {split!r} needs at least one scene, got {n}")
    if out_root.exists() and not (out_root.is_dir() and (not any(out_root.iterdir()) or _is_tinyworld(out_root))):
        raise InputError(f"refusing to overwrite {out_root}: not empty and not a tiny-world data set")
    out_root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_root.parent, prefix=f".{out_root.name}.tmp-"))
    try:
        for split, n in sizes.items():
            _write_split(tmp / split, split, seed, n)
        meta = {"generator": GENERATOR_VERSION, "seed": seed, "sizes": sizes}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if out_root.exists():
            trash = Path(tempfile.mkdtemp(dir=out_root.parent, prefix=f".{out_root.name}.old-"))
            os.replace(out_root, trash / "old")
            os.replace(tmp, out_root)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_root


def default_tinyworld_root() -> Path:
    """The benchmark's default data set (seed 0, default sizes), generated once into the user cache.

    Lives in the user cache (:func:`llavaseg.paths.cache_root`) as ``tinyworld-v1-seed0``. Concurrent first calls
    are safe: each builds a private temporary copy, and one rename wins.
    """
    return _cached_tinyworld(cache_dir(f"{GENERATOR_VERSION}-seed0"), DEFAULT_SIZES)


def selection_tinyworld_root(split: str = "select") -> Path:
    """A selection split (seed 0, :data:`SELECT_SIZE` scenes), generated once into its own cache folder
    (``tinyworld-v1-seed0-<split>``), so the default data set and everything keyed by it stay as they are."""
    if split not in SELECTION_STARTS:
        raise InputError(f"unknown selection split {split!r}; expected one of {sorted(SELECTION_STARTS)}")
    return _cached_tinyworld(cache_dir(f"{GENERATOR_VERSION}-seed0-{split}"), {split: SELECT_SIZE})


def _cached_tinyworld(root: Path, sizes: Mapping[str, int]) -> Path:
    if _is_tinyworld(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.build-"))
    try:
        built = generate_tinyworld(tmp_root / "data", seed=0, sizes=sizes)
        try:
            os.rename(built, root)  # fails if another process already placed a non-empty copy
        except OSError:
            if not _is_tinyworld(root):
                raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return root


def default_tiny_world_source(split: str, *, first_text_only: bool = False) -> DataSource:
    """The embedded tiny world (generated once into the user cache) as a ReasonSeg data source."""
    root = selection_tinyworld_root(split) if split in SELECTION_STARTS else default_tinyworld_root()
    return DataSource(kind="reasonseg", path=root, split=split, first_text_only=first_text_only)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m llavaseg.tinyworld.generate --out DIR --seed 0 [--train N --val N --test N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory (created or replaced)")
    parser.add_argument("--seed", type=int, default=0)
    for split, n in DEFAULT_SIZES.items():
        parser.add_argument(f"--{split}", type=int, default=n, help=f"number of {split} scenes (default {n})")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = generate_tinyworld(args.out, args.seed, {s: getattr(args, s) for s in DEFAULT_SIZES})
    except InputError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
