"""Components given by flag, as a user with real weights gives them: tiny models of the real classes saved in the
real layouts (a transformers ``save_pretrained`` folder, a segment_anything ``.pth`` state dict, an open_clip
weights file), through ``llavaseg segment``, ``llavaseg-train`` and ``llavaseg-bench``, offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llavaseg.cli.bench import main as bench_main
from llavaseg.cli.main import main as segment_main
from llavaseg.cli.train import main as train_main


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, str]:
    from llavaseg.models.sam_spec import SAM_SPECS, build_sam_from_spec
    from llavaseg.models.text_encoder import FrozenTextEncoder
    from llavaseg.models.tiny_llava import build_tiny_llava, tiny_vocabulary

    root = tmp_path_factory.mktemp("layouts")
    model, processor = build_tiny_llava(tiny_vocabulary(), seed=3)
    model.save_pretrained(root / "llava-tiny")
    processor.save_pretrained(root / "llava-tiny")
    torch.manual_seed(4)
    torch.save(build_sam_from_spec(SAM_SPECS["tiny"]).state_dict(), root / "sam_tiny.pth")  # as SAM's releases are
    clip = FrozenTextEncoder.create("tiny-clip", seed=5)
    torch.save(clip.model.state_dict(), root / "open_clip_pytorch_model.bin")  # as open_clip's releases are
    return {"mllm": str(root / "llava-tiny"), "sam": str(root / "sam_tiny.pth"),
            "clip": f"tiny-clip:{root / 'open_clip_pytorch_model.bin'}"}


@pytest.fixture(scope="module")
def world(make_tiny_world) -> Path:
    return make_tiny_world(seed=8, sizes={"train": 2, "val": 2})


def _flags(layouts: dict[str, str]) -> list[str]:
    return ["--mllm", layouts["mllm"], "--sam", layouts["sam"], "--clip", layouts["clip"]]


def test_missing_adapters_are_refused_in_one_line_before_anything_loads(layouts, world, tmp_path):
    image = next((world / "val").glob("*.png"))
    # The CLI run as `python -m llavaseg.cli.main`, reporting on stdout whether torch was ever imported: the
    # refusal must come before any model (or torch) loads, which is what makes it cost a fraction of a second.
    probe = ("import runpy, sys\n"
             "try:\n    runpy.run_module('llavaseg.cli.main', run_name='__main__', alter_sys=True)\n"
             "finally:\n    print('torch imported:', 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", probe, "segment", str(image), "the red circle",
                          *_flags(layouts), "--out", str(tmp_path / "m.png")], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr
    assert "route llavaseg needs trained adapters" in lines[0] and "llavaseg-train" in lines[0]
    assert "torch imported: False" in run.stdout
    assert not (tmp_path / "m.png").exists()


def test_allow_untrained_writes_the_mask_and_says_so(layouts, world, tmp_path, capsys):
    image = next((world / "val").glob("*.png"))
    out = tmp_path / "m.png"
    assert segment_main(["segment", str(image), "the red circle", *_flags(layouts), "--allow-untrained",
                         "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["untrained"] == ["adapters"]
    assert record["provenance"]["components"]["sam"]["source"] == layouts["sam"]
    assert record["provenance"]["components"]["sam"]["spec"] == "tiny"  # the ViT type read from the tensors
    with Image.open(out) as mask:
        assert mask.size == (128, 128)


def test_train_then_segment_and_bench_through_the_flags(layouts, world, tmp_path, capsys):
    adapters = tmp_path / "adapters"
    assert train_main(["--preset", "tiny", *_flags(layouts), "--data", str(world), "--stage-source", "teacher",
                       "--steps", "2", "--batch-size", "2", "--eval-every", "0", "--quiet",
                       "--cache-dir", str(tmp_path / "cache"), "--checkpoint-dir", str(tmp_path / "ckpt"),
                       "--out", str(adapters)]) == 0
    capsys.readouterr()
    card = json.loads((adapters / "card.json").read_text())
    assert card["config"]["components"]["sam"] == layouts["sam"]
    image = next((world / "val").glob("*.png"))
    assert segment_main(["segment", str(image), "the red circle", *_flags(layouts), "--adapters", str(adapters),
                         "--out", str(tmp_path / "m.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["untrained"] == []
    out = tmp_path / "bench"
    assert bench_main(["reasonseg", "--data", str(world), "--limit", "2", *_flags(layouts), "--adapters",
                       str(adapters), "--routes", "llavaseg,training-free", "--no-dialogue", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["routes"]) == {"llavaseg", "training-free"}
    assert all(summary["untrained"] == [] and summary["n_queries"] == 2 for summary in results["routes"].values())
    components = results["environment"]["provenance"]["components"]
    assert components["mllm"]["source"] == layouts["mllm"] and components["adapters"]["source"] == str(adapters)


def test_named_routes_missing_their_trained_part_are_refused(layouts, world, tmp_path, capsys):
    assert bench_main(["reasonseg", "--data", str(world), "--limit", "2", *_flags(layouts),
                       "--routes", "llavaseg,seg-token", "--out", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "route llavaseg needs trained adapters" in error
    assert not (tmp_path / "b").exists()


def test_unnamed_routes_missing_a_part_are_skipped_and_untrained_ones_marked(layouts, world, tmp_path, capsys):
    out = tmp_path / "b"
    assert bench_main(["reasonseg", "--data", str(world), "--limit", "1", *_flags(layouts), "--no-dialogue",
                       "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["routes"]) == ["training-free"]
    assert set(results["skipped_routes"]) == {"llavaseg", "llavaseg-noattr", "llavaseg-oracle", "llavaseg-verify", "seg-token",
                                              "seg-token-cot"}
    allowed = tmp_path / "allowed"
    assert bench_main(["reasonseg", "--data", str(world), "--limit", "1", *_flags(layouts), "--no-dialogue",
                       "--allow-untrained", "--routes", "llavaseg,training-free", "--out", str(allowed)]) == 0
    results = json.loads((allowed / "results.json").read_text())
    assert results["routes"]["llavaseg"]["untrained"] == ["adapters"]
    assert results["routes"]["training-free"]["untrained"] == []
    assert "(untrained: adapters)" in capsys.readouterr().out


def test_a_typo_in_any_flag_is_one_line(layouts, world, tmp_path, capsys):
    image = next((world / "val").glob("*.png"))
    cases = [(["--sam", str(tmp_path / "nope.pth")], "SAM checkpoint not found"),
             (["--clip", "not-a-model"], "unknown open_clip model 'not-a-model'"),
             (["--clip", "tiny-clip:" + str(tmp_path / "missing.bin")], "weights file not found"),
             (["--mllm", str(tmp_path)], "not a transformers model folder"),
             (["--adapters", str(tmp_path)], "holds no adapters"),
             (["--route", "seg-token", "--seg-token", str(tmp_path)], "neither a [SEG] model")]
    for flags, message in cases:
        base = dict(zip(("--mllm", "--sam", "--clip"), (layouts["mllm"], layouts["sam"], layouts["clip"])))
        args = [item for key, value in base.items() if key not in flags for item in (key, value)]
        code = segment_main(["segment", str(image), "q", *args, *flags, "--allow-untrained", "--out",
                             str(tmp_path / "m.png")])
        error = capsys.readouterr().err.strip()
        assert code == 2 and len(error.splitlines()) == 1 and message in error, (flags, error)


def test_sam_architecture_is_read_from_the_tensors_of_published_layouts(tmp_path):
    from segment_anything import sam_model_registry

    from llavaseg.models.components import check_spec
    from llavaseg.models.presets import PRESETS
    from llavaseg.models.sam_spec import infer_sam_spec

    for name in ("vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            state = sam_model_registry[name]().state_dict()
        assert infer_sam_spec({key: tuple(value.shape) for key, value in state.items()}).name == name
    hf = tmp_path / "sam-vit-base"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "sam"}))
    spec = PRESETS["tiny"].spec().with_sources(sam=str(hf))
    with pytest.raises(Exception, match="transformers SamModel folder"):
        check_spec(spec)


def test_clip_tags_get_quick_gelu_as_open_clip_says():
    from llavaseg.models.text_encoder import _tag_wants_quick_gelu

    assert _tag_wants_quick_gelu("ViT-L-14", "openai")  # OpenAI's weights were trained with QuickGELU
    assert not _tag_wants_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    assert not _tag_wants_quick_gelu("ViT-L-14-quickgelu", "metaclip_fullcc")  # the config already has it


def test_save_pretrained_round_trip_gives_identical_masks(tmp_path, rgb_image):
    from llavaseg import Segmenter

    segmenter = Segmenter.from_preset("tiny-world")
    queries = ["the circle that has the same colour as the square", "the large red shape"]
    image = np.asarray(Image.open(Path(__file__).resolve().parents[1] / "llavaseg" / "tinyworld" / "sample_scene.png"))
    before = segmenter([image, rgb_image], queries)
    manifest = segmenter.save_pretrained(tmp_path / "pipeline")
    assert json.loads(manifest.read_text())["adapters"] == "adapters"
    after = Segmenter.from_pretrained(tmp_path / "pipeline")([image, rgb_image], queries)
    assert all(np.array_equal(a.mask, b.mask) and a.answer == b.answer for a, b in zip(before, after))
    from llavaseg.models.presets import TOY_NOTICE

    assert after[0].notices == before[0].notices == [TOY_NOTICE]


def test_a_pipeline_whose_frozen_model_changed_is_refused(tmp_path):
    from llavaseg import Segmenter
    from llavaseg.errors import CheckpointMismatchError

    Segmenter.from_preset("tiny").save_pretrained(tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    manifest["sam"]["identity"]["weights"] = "0" * 16
    (tmp_path / "p" / "pipeline.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointMismatchError, match="SAM .* is not the one this pipeline was saved with"):
        Segmenter.from_pretrained(tmp_path / "p")


def test_a_pipelines_own_prompts_are_used_by_the_cli_unless_prompts_is_given(tmp_path, capsys):
    """A pipeline folder is the whole pipeline: ``llavaseg segment --pipeline`` reads the templates saved with
    it, as ``Segmenter.from_pretrained`` does; an explicit ``--prompts`` still wins."""
    from llavaseg import Segmenter
    from llavaseg.prompting import default_prompts_dir

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "reason.txt").write_text("{query}\nWhat is meant here ? Answer with its name only .\n")
    Segmenter.from_preset("tiny", prompts_dir=mine).save_pretrained(tmp_path / "p")
    image = tmp_path / "img.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)

    def reason_prompt(*extra: str) -> str:
        assert segment_main(["segment", str(image), "the red square", "--pipeline", str(tmp_path / "p"),
                             "--out", str(tmp_path / "m.png"), "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["prompts"]["reason"]

    assert "What is meant here ?" in reason_prompt()
    assert "What is meant here ?" not in reason_prompt("--prompts", str(default_prompts_dir()))
    from llavaseg.cli.train import _parser, build_config

    train = build_config(_parser().parse_args(["--preset", "tiny", "--pipeline", str(tmp_path / "p")]))
    assert train.prompts_dir == tmp_path / "p" / "prompts"  # llavaseg-train reads them too
