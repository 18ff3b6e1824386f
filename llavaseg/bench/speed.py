"""Speed and memory measurements of the frozen pipeline (``benchmarks/speed.py``, ``llavaseg-bench speed``).

Each measurement isolates one reuse the library makes, on the same machine in one run:

* ``stage2_cache``: stage 2 continuing stage 1's key/value cache vs re-encoding image + conversation;
* ``repeat_image``: a second query on an already-seen image vs the first query (SAM ViT-B at 1024 px, random
  weights: only timing matters);
* ``batching``: one batch of 8 (image, query) pairs vs 8 single calls;
* ``sam_encoder``: the library's SAM image encoding vs segment_anything's ``SamPredictor.set_image``;
* ``stages``: per-stage seconds of a first and a later query, and peak RSS.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from llavaseg.models.components import new_adapters
from llavaseg.models.mllm import FrozenMLLM
from llavaseg.models.sam import FrozenSAM
from llavaseg.models.text_encoder import FrozenTextEncoder
from llavaseg.models.tiny_llava import TinyLlavaSpec, build_tiny_llava


class Ratio(BaseModel):
    """``baseline_s / improved_s``: how many times faster the reuse makes it (> 1 is faster)."""

    name: str
    baseline: str
    improved: str
    baseline_s: float
    improved_s: float
    ratio: float
    note: str = ""


class SpeedReport(BaseModel):
    machine: dict[str, Any]
    ratios: list[Ratio] = Field(default_factory=list)
    stages: dict[str, dict[str, float]] = Field(default_factory=dict)
    peak_rss_mb: float = 0.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def best_of_interleaved(first: Callable[[], Any], second: Callable[[], Any], repeats: int, *,
                        self_timed: bool = False) -> tuple[float, float]:
    """Minimum wall time of each of two functions over ``repeats`` alternating runs.

    The minimum is the least noisy estimate on a shared machine; alternating means a change of load (another
    job starting, the allocator's state) hits both sides of a ratio instead of one. ``self_timed``: the
    functions return the seconds of the part that counts (setup excluded) instead of being timed whole.
    """
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for function, bucket in zip((first, second), times):
            start = time.perf_counter()
            measured = function()
            bucket.append(measured if self_timed else time.perf_counter() - start)
    return min(times[0]), min(times[1])


def _ratio(name: str, baseline: str, improved: str, baseline_s: float, improved_s: float, note: str = "") -> Ratio:
    return Ratio(name=name, baseline=baseline, improved=improved, baseline_s=round(baseline_s, 4),
                 improved_s=round(improved_s, 4), ratio=round(baseline_s / max(improved_s, 1e-9), 2), note=note)


def _scenes(count: int, size: int = 128, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def llava_shaped_mllm(device: str = "cpu") -> FrozenMLLM:
    """A random LLaVA-1.5-*shaped* model (336 px / patch 14 = 576 image tokens, narrow layers) for timing
    stage reuse where the prompt is as long as a real one; its answers are meaningless."""
    from llavaseg.models.tiny_llava import tiny_vocabulary

    spec = TinyLlavaSpec(image_size=336, patch_size=14, vision_hidden=128, vision_layers=4, vision_heads=4,
                         text_hidden=256, text_layers=4, text_heads=4, text_intermediate=512, max_positions=1024)
    model, processor = build_tiny_llava(tiny_vocabulary(), spec, seed=0)
    return FrozenMLLM(model.to(device), processor, name="llava-shaped-random", max_new_tokens=16)


def measure_stage2_cache(mllm: FrozenMLLM, repeats: int = 3, max_new_tokens: int | None = None) -> Ratio:
    """Whole stage-2 turn (``max_new_tokens=None``) or its prefill alone (``max_new_tokens=1``)."""
    image = _scenes(1)[0]
    first, second = "the shape that has the same colour as the square", "what colour is it ?"

    def stage2(reuse: bool) -> float:
        _, state = mllm.begin([image], [first], reuse_cache=reuse)
        start = time.perf_counter()
        mllm.follow_up(state, [second], max_new_tokens=max_new_tokens)
        return time.perf_counter() - start

    stage2(True)  # warm-up (allocations, caches)
    reencode, reused = best_of_interleaved(lambda: stage2(False), lambda: stage2(True), repeats, self_timed=True)
    what = "first token only" if max_new_tokens == 1 else f"up to {max_new_tokens or mllm.max_new_tokens} tokens"
    return _ratio("stage2_cache", "stage 2 re-encoding image + conversation", "stage 2 from stage 1's KV cache",
                  reencode, reused, note=f"MLLM {mllm.name}, {what}")


def measure_repeat_image(mllm: FrozenMLLM, text_encoder: FrozenTextEncoder, sam_type: str = "vit_b",
                         device: str = "cpu") -> tuple[Ratio, dict]:
    from llavaseg.segmenter import Segmenter

    sam = FrozenSAM.create(sam_type, seed=0, device=device)
    adapters = new_adapters(sam, text_encoder, dim=128, heads=4, scales=(8, 4, 2, 2, 1)[-len(sam.feature_layers) - 1:])
    segmenter = Segmenter(mllm, sam, text_encoder, adapters, with_answer=False)
    image = _scenes(1, size=640, seed=3)[0]
    start = time.perf_counter()
    first = segmenter(image, "the large blue shape")
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    later = segmenter(image, "the circle in the top left")
    later_s = time.perf_counter() - start
    return (_ratio("repeat_image", "first query on an image", "second query on the same image", first_s, later_s,
                   note=f"SAM {sam_type} at {sam.spec.image_size} px (random weights), MLLM {mllm.name}"),
            {"first_query": first.timings, "later_query": later.timings})


def measure_batching(segmenter, batch: int = 8, repeats: int = 2) -> Ratio:
    images = _scenes(batch, seed=7)
    queries = [f"the {c} shape" for c in ("red", "green", "blue", "yellow", "purple", "orange", "red", "blue")][:batch]

    def singles() -> None:
        segmenter.sam.clear_cache()
        segmenter.mllm._image_cache.clear()
        for image, query in zip(images, queries):
            segmenter(image, query)

    def batched() -> None:
        segmenter.sam.clear_cache()
        segmenter.mllm._image_cache.clear()
        segmenter(images, queries)

    singles()  # warm-up
    single_s, batch_s = best_of_interleaved(singles, batched, repeats)
    return _ratio("batching", f"{batch} single calls", f"one batch of {batch}", single_s, batch_s,
                  note="throughput ratio (queries per second, batch / single)")


def measure_sam_encoder(sam_type: str = "vit_b", repeats: int = 2, device: str = "cpu") -> Ratio:
    from segment_anything import SamPredictor

    sam = FrozenSAM.create(sam_type, seed=0, device=device, half_encoder=False)
    predictor = SamPredictor(sam.sam)
    image = _scenes(1, size=768, seed=5)[0]

    def ours() -> None:
        sam.clear_cache()
        sam.encode(image)

    def upstream() -> None:
        with torch.no_grad():
            predictor.set_image(image)

    upstream_s, ours_s = best_of_interleaved(upstream, ours, repeats)
    return _ratio("sam_encoder", "SamPredictor.set_image", "FrozenSAM.encode (with multi-scale levels)", upstream_s,
                  ours_s, note=f"{sam_type} at {sam.spec.image_size} px, random weights; ratio >= ~1 means no slower")


def measure_training_free(preset: str, device: str = "cpu", count: int = 16) -> Ratio:
    """Seconds per query of the training-free route vs the llavaseg route, same tiny-world val queries (about
    two texts per image, so per-image work is reused as in a benchmark)."""
    from llavaseg.data.registry import open_dataset
    from llavaseg.segmenter import Segmenter
    from llavaseg.tinyworld.generate import default_tiny_world_source

    queries = list(open_dataset(default_tiny_world_source("val")).queries())[:count]
    images, texts = [q.load_image() for q in queries], [q.text for q in queries]
    seconds = {}
    for route in ("llavaseg", "training-free"):
        segmenter = Segmenter.from_preset(preset, route=route, device=device, batch_size=8, with_answer=False)
        segmenter(images[:2], texts[:2])  # warm-up
        segmenter.sam.clear_cache()
        start = time.perf_counter()
        segmenter(images, texts)
        seconds[route] = (time.perf_counter() - start) / count
    return _ratio("training_free", "training-free route (s/query)", "llavaseg route (s/query)",
                  seconds["training-free"], seconds["llavaseg"],
                  note=f"{count} tiny-world val queries, {preset}; ratio = training-free / llavaseg time (target <= 3)")


def run_speed(preset: str = "tiny", *, full: bool = True, repeats: int = 2, device: str = "cpu") -> SpeedReport:
    """All measurements; ``full=False`` skips the ViT-B ones (for a quick look)."""
    from llavaseg.segmenter import Segmenter

    report = SpeedReport(machine={"python": platform.python_version(), "torch": torch.__version__,
                                 "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                                 "device": device})
    segmenter = Segmenter.from_preset(preset, batch_size=8, device=device)
    shaped = llava_shaped_mllm(device)
    report.ratios.append(measure_stage2_cache(shaped, repeats=repeats))
    report.ratios.append(measure_stage2_cache(shaped, repeats=repeats, max_new_tokens=1))
    report.ratios.append(measure_stage2_cache(segmenter.mllm, repeats=repeats))
    report.ratios.append(measure_batching(segmenter, repeats=repeats))
    if preset == "tiny-world":
        report.ratios.append(measure_training_free(preset, device))
    image = _scenes(1, seed=11)[0]
    segmenter.sam.clear_cache()
    report.stages[f"{preset}: first query"] = segmenter(image, "the large blue shape").timings
    report.stages[f"{preset}: later query, same image"] = segmenter(image, "the red circle").timings
    if full:
        report.ratios.append(measure_sam_encoder(repeats=repeats, device=device))
        ratio, stages = measure_repeat_image(segmenter.mllm, segmenter.text_encoder, device=device)
        report.ratios.append(ratio)
        report.stages.update({f"vit_b: {k}": v for k, v in stages.items()})
    report.peak_rss_mb = round(peak_rss_mb(), 1)
    return report


def format_report(report: SpeedReport) -> str:
    lines = [f"{'measurement':14s} {'baseline s':>11s} {'improved s':>11s} {'ratio':>7s}  what"]
    for ratio in report.ratios:
        lines.append(f"{ratio.name:14s} {ratio.baseline_s:11.4f} {ratio.improved_s:11.4f} {ratio.ratio:7.2f}  "
                     f"{ratio.baseline} -> {ratio.improved} ({ratio.note})")
    for name, stages in report.stages.items():
        total = sum(stages.values())
        parts = ", ".join(f"{k} {v:.4f}" for k, v in stages.items())
        lines.append(f"stages [{name}] total {total:.3f}s: {parts}")
    lines.append(f"peak RSS {report.peak_rss_mb:.0f} MB; median ratio "
                 f"{statistics.median([r.ratio for r in report.ratios]):.2f}")
    return "\n".join(lines)
