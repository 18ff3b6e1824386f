"""Regenerate the shipped tiny-world weights from the configs their cards record, and compare them byte for byte.

    python benchmarks/regenerate.py [--models sam clip mllm adapters seg-token seg-token-cot] [--work runs/regenerate]

Each model is retrained from scratch by its own script with the recorded config and seed, into ``--work``; then
every shipped weight file (and the configs and tokenizer saved with it; not the cards, which hold timings) is
compared with the regenerated one (sha256), and the val figure the script measures with the shipped card's.
Byte equality is expected on the machine kind the card records (torch build, CPU model, one thread); another
build or CPU sums floating point in another order, so then the figures should agree within noise instead
(``docs/tinyworld.md``). The report (``benchmarks/results/regenerate.json``) says which case applied.

Full runs take long (one CPU core, measured: SAM 10 min, open_clip 11 min, MLLM 87 min, adapters 5 min,
``<SEG>`` 8 min), so this is a benchmark, not a test; ``tests/test_regenerate.py`` repeats the adapter case under
``-m slow``. A killed run resumes from its checkpoints in ``--work``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llavaseg.atomic import atomic_write_text
from llavaseg.provenance import machine, same_machine_kind

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "llavaseg" / "weights" / "tinyworld"
ADAPTERS = ROOT / "adapters" / "tiny-world"
RESULTS = Path(__file__).resolve().parent / "results" / "regenerate.json"
MODELS = ("sam", "clip", "mllm", "adapters", "seg-token", "seg-token-cot")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _card(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def regenerate_sam(work: Path) -> tuple[list[tuple[Path, Path]], dict[str, Any]]:
    from llavaseg.recipes.train_sam import TrainConfig, train_sam

    card = _card(WEIGHTS / "sam_tiny_world.json")
    report = train_sam(TrainConfig(**card["config"]), work, threads=card["threads"])
    return ([(WEIGHTS / "sam_tiny_world.safetensors", work / "sam_tiny_world.safetensors")],
            {"metric": "val_oracle_box_miou", "shipped": card["val_oracle_box_miou"],
             "regenerated": report.val_oracle_box_miou,
             "shipped_machine": card.get("machine") or {"torch": card["torch_version"]}})


def regenerate_clip(work: Path) -> tuple[list[tuple[Path, Path]], dict[str, Any]]:
    from llavaseg.recipes.train_clip import ClipTrainConfig, train_clip

    card = _card(WEIGHTS / "clip" / "train_report.json")
    report = train_clip(work, ClipTrainConfig(**card["config"]), progress=False)
    names = ("open_clip_model.safetensors", "open_clip_config.json")
    return ([(WEIGHTS / "clip" / name, work / name) for name in names],
            {"metric": "val caption_accuracy", "shipped": card["val"]["caption_accuracy"],
             "regenerated": report.val.caption_accuracy,
             "shipped_machine": card.get("machine") or {"torch": card["torch_version"]}})


def _from_git(init: dict[str, Any], folder: Path) -> Path:
    """The files of ``init["git"]`` (``<commit>:<folder>``) written into ``folder``, checked against the digest
    the card recorded for them."""
    import subprocess

    from transformers import LlavaForConditionalGeneration

    from llavaseg.recipes.train_mllm import weights_digest

    commit, _, source = init["git"].partition(":")
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{commit}:{source}"], check=True,
                           capture_output=True, text=True).stdout.split()
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{source}/{name}"], check=True,
                              capture_output=True).stdout
        (folder / name).write_bytes(blob)
    if weights_digest(LlavaForConditionalGeneration.from_pretrained(folder)) != init["weights_digest"]:
        raise SystemExit(f"{init['git']} does not hold the weights the card started from")
    return folder


def regenerate_mllm(work: Path) -> tuple[list[tuple[Path, Path]], dict[str, Any]]:
    from llavaseg.models.mllm import FrozenMLLM
    from llavaseg.prompting import PromptSet
    from llavaseg.recipes.mllm_data import evaluate_mllm
    from llavaseg.recipes.train_mllm import TrainConfig, save_model, train_mllm

    card = _card(WEIGHTS / "mllm_card.json")
    config = TrainConfig(**card["config"])
    if card.get("init_from"):  # the region stage started from an earlier shipped model: take it from git
        config = config.model_copy(update={"init_from": str(_from_git(card["init_from"], work / "init"))})
    model, processor, _ = train_mllm(config, work / "checkpoints", log=lambda *_: None)
    save_model(model, processor, work / "mllm")
    report = evaluate_mllm(FrozenMLLM.from_pretrained(work / "mllm", local_files_only=True), PromptSet.load(),
                           "val", config.data_seed)
    shipped = sorted(path for path in (WEIGHTS / "mllm").iterdir() if path.is_file())  # weights, tokenizer, configs
    return ([(path, work / "mllm" / path.name) for path in shipped],
            {"metric": "val attribute_accuracy", "shipped": card["val"]["attribute_accuracy"],
             "regenerated": report["attribute_accuracy"], "shipped_machine": card["machine"]})


def regenerate_adapters(work: Path) -> tuple[list[tuple[Path, Path]], dict[str, Any]]:
    from llavaseg.train import TrainConfig, train_adapters

    card = _card(ADAPTERS / "card.json")
    config = TrainConfig.model_validate({**card["config"], "out": work / "tiny-world", "cache_dir": work / "cache",
                                         "checkpoint_dir": work / "checkpoints", "eval_every": 0,
                                         "progress": False})
    result = train_adapters(config)
    return ([(ADAPTERS / name, work / "tiny-world" / name) for name in ("adapters.safetensors", "config.json")],
            {"metric": "val gIoU (ground-truth stages)", "shipped": card["val"]["giou"],
             "regenerated": result.val.giou if result.val else None,
             "shipped_machine": card.get("machine") or {"torch": card["torch"]}})


def regenerate_seg_token(work: Path, name: str = "seg_token") -> tuple[list[tuple[Path, Path]], dict[str, Any]]:
    from llavaseg.recipes.train_seg_token import SegTokenTrainConfig, train
    from llavaseg.tinyworld.generate import default_tinyworld_root

    card = _card(WEIGHTS / name / "card.json")
    report = train(SegTokenTrainConfig(**card["config"]), work / name, work / f"checkpoints-{name}",
                   default_tinyworld_root(), threads=card["threads"])
    return ([(WEIGHTS / name / file, work / name / file) for file in ("seg_token.safetensors", "seg_token.json")],
            {"metric": "val gIoU (generated [SEG])", "shipped": card["val_generate"]["giou"],
             "regenerated": report.val_generate.giou,
             "shipped_machine": card.get("machine") or {"torch": card.get("torch_version")}})


def regenerate_seg_token_cot(work: Path) -> tuple[list[tuple[Path, Path]], dict[str, Any]]:
    return regenerate_seg_token(work, "seg_token_cot")


REGENERATORS: dict[str, Callable[[Path], tuple[list[tuple[Path, Path]], dict[str, Any]]]] = {
    "sam": regenerate_sam, "clip": regenerate_clip, "mllm": regenerate_mllm, "adapters": regenerate_adapters,
    "seg-token": regenerate_seg_token, "seg-token-cot": regenerate_seg_token_cot,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "regenerate")
    parser.add_argument("--report", type=Path, default=RESULTS, help="JSON report (merged with an existing one)")
    args = parser.parse_args(argv)
    for name in args.models:
        start = time.perf_counter()
        print(f"[regenerate] {name} ...", flush=True)
        pairs, figures = REGENERATORS[name](args.work / name)
        files = []
        for shipped, again in pairs:
            digests = sha256(shipped), sha256(again)
            files.append({"file": str(shipped.relative_to(ROOT)), "shipped_sha256": digests[0],
                          "regenerated_sha256": digests[1], "identical": digests[0] == digests[1]})
        entry = {"files": files, **figures, "same_machine_kind": same_machine_kind(figures["shipped_machine"]),
                 "machine": machine(),
                 "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
                 "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
        # Re-read just before writing: several runs (one per core) may share one report.
        report = _card(args.report) if args.report.is_file() else {"models": {}}
        report["models"][name] = entry
        atomic_write_text(args.report, json.dumps(report, indent=1) + "\n")
        verdict = "identical bytes" if all(f["identical"] for f in files) else "bytes differ"
        print(f"[regenerate] {name}: {verdict}; {figures['metric']} shipped {figures['shipped']} "
              f"regenerated {figures['regenerated']} ({entry['seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
