"""Time one adapter training step (LLaVASeg, cached frozen features) against one ``<SEG>``-token training step.

    python benchmarks/train_step.py [--preset tiny|tiny-world] [--batch-size 4] [--repeats 10] [--threads 1]

Both steps use the same frozen models and the same batch of tiny-world queries:

* **adapter, cached**: what ``llavaseg-train`` does per step: read SAM features + text embeddings from the
  feature cache, adapters -> frozen SAM decoder -> upsample -> BCE + Dice -> AdamW (``adapter_train_step``);
* **adapter, uncached** (for reference): the same step when the frozen models run every time (MLLM's two chat
  turns, text encoder, SAM image encoder) -- what the cache saves;
* **<SEG> token**: LISA's step on the same MLLM/SAM (``llavaseg.seg_token.train.seg_token_train_step``: LLaVA
  forward with LoRA + CE + BCE + Dice, backward through the LLM, AdamW over LoRA, embeddings, LM head, MLP and
  the mask decoder). SAM image features are passed in precomputed (LISA re-encodes each step; this favours
  ``<SEG>``). Tokenisation (``make_batch``) is done once outside the timed region.

Reports the median wall time over ``--repeats`` steps after one warm-up step, the wall-time ratio and the
trainable-parameter ratio, as a table and as JSON (``benchmarks/results/train_step.json``). If the ``<SEG>``
module is not installed the script still reports the adapter half. Speed is measured here, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from llavaseg.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"


def _median_seconds(step: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    step()  # warm-up (allocations, lazy init)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _batch(count: int, seed: int) -> tuple[list[np.ndarray], list[str], list[bool], list[np.ndarray], list[tuple]]:
    """``count`` tiny-world train queries (first text of each scene) with images and ground-truth masks."""
    from llavaseg.data.reasonseg import polygons_to_mask
    from llavaseg.tinyworld.generate import iter_scenes

    images, texts, sentences, masks, stages = [], [], [], [], []
    for scene, image, targets, _ in iter_scenes("train", seed=seed, count=count):
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        target = targets[0]
        images.append(array)
        texts.append(target.text)
        sentences.append(target.is_sentence)
        masks.append(polygons_to_mask([{"label": "target", "points": scene.objects[target.target_index].polygon}],
                                      *array.shape[:2]))
        stages.append((target.description, dict(target.attributes)))
    return images, texts, sentences, masks, stages


class _Query:
    """Minimal SegQuery over in-memory arrays (for building the cache of the benchmark batch)."""

    def __init__(self, index: int, image: np.ndarray, text: str, is_sentence: bool, mask: np.ndarray) -> None:
        self.query_id, self.sample_id, self.text_index = f"bench#{index}", f"bench/{index}", 0
        self.text, self.is_sentence, self._image, self._mask = text, is_sentence, image, mask

    def load_image(self) -> np.ndarray:
        return self._image

    def load_mask(self) -> np.ndarray:
        return self._mask


def _compiled_vs_eager(step: Callable[[torch.nn.Module], Any], module: torch.nn.Module, repeats: int
                       ) -> dict[str, float]:
    """``torch.compile(module)`` against the module itself in the same step, interleaved and best of
    ``repeats`` (:func:`llavaseg.bench.speed.best_of_interleaved`); the first compiled call, which compiles, is
    timed on its own."""
    from llavaseg.bench.speed import best_of_interleaved

    compiled = torch.compile(module)
    start = time.perf_counter()
    step(compiled)
    compile_seconds = time.perf_counter() - start
    eager, fast = best_of_interleaved(lambda: step(module), lambda: step(compiled), 2 * repeats)
    return {"eager_step_seconds": eager, "compiled_step_seconds": fast,
            "first_compiled_call_seconds": compile_seconds, "speedup": eager / fast}


def adapter_half(parts: Any, prompts: Any, images, texts, sentences, masks, *, repeats: int,
                 compile_check: bool = False) -> dict[str, Any]:
    from llavaseg.cache import FeatureCache, build_cache, cache_identity
    from llavaseg.method.segment import encode_phrases, text_phrases
    from llavaseg.method.stages import run_stages
    from llavaseg.train import adapter_train_step

    adapters, sam = parts.adapters, parts.sam
    with tempfile.TemporaryDirectory() as tmp:
        identity = cache_identity(sam, parts.text_encoder, max_text_tokens=adapters.config.max_text_tokens,
                                  mllm=parts.mllm, prompts=prompts)
        cache = FeatureCache(tmp, identity)
        sam.clear_cache()
        start = time.perf_counter()
        keys = build_cache(cache, [_Query(i, *row) for i, row in enumerate(zip(images, texts, sentences, masks))],
                           sam=sam, text_encoder=parts.text_encoder, mllm=parts.mllm, prompts=prompts,
                           batch_size=len(images), progress=False)
        cache_seconds = time.perf_counter() - start
        samples = cache.load_samples(keys)
        optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)

        def cached_step() -> float:
            features = [cache.image_features(s.entry.image) for s in samples]
            return adapter_train_step(adapters, sam, optimizer, features, [s.text for s in samples],
                                      [s.mask for s in samples])[0]

        cached, cached_all = _median_seconds(cached_step, repeats)
        compiled = None
        if compile_check:
            features = [cache.image_features(s.entry.image) for s in samples]
            compiled = _compiled_vs_eager(
                lambda module: adapter_train_step(module, sam, optimizer, features, [s.text for s in samples],
                                                  [s.mask for s in samples]), adapters, repeats)

    def uncached_step() -> float:
        sam.clear_cache()
        stages = run_stages(parts.mllm, prompts, images, texts)
        phrases = [text_phrases(s.description, s.attributes, True, adapters.config.max_text_tokens) for s in stages]
        parts.text_encoder._cache.clear()  # noqa: SLF001 - measure real encoding, not the memo
        text, mask = encode_phrases(parts.text_encoder, phrases)
        features = sam.encode_batch(images)
        texts_ragged = [text[i, : int(mask[i].sum())] for i in range(len(images))]
        return adapter_train_step(adapters, sam, optimizer, features, texts_ragged, masks)[0]

    uncached, _ = _median_seconds(uncached_step, max(2, repeats // 3))
    return {"step_seconds_cached": cached, "step_seconds_uncached": uncached, "cache_build_seconds": cache_seconds,
            "cache_build_seconds_per_query": cache_seconds / len(images), "all_cached_step_seconds": cached_all,
            "trainable_parameters": sum(p.numel() for p in adapters.parameters() if p.requires_grad),
            **({"torch_compile_cached_step": compiled} if compiled else {})}


def seg_token_half(parts: Any, images, texts, sentences, masks, *, repeats: int) -> dict[str, Any]:
    """The ``<SEG>`` step via the seg-token module's public training-step function (if installed)."""
    try:
        from llavaseg.seg_token.model import create_seg_token_model
        from llavaseg.seg_token.train import (
            SegSample,
            make_batch,
            make_optimizer,
            seg_token_train_step,
        )
    except ImportError as exc:
        return {"available": False, "reason": f"llavaseg.seg_token not importable: {exc}"}
    import random

    model = create_seg_token_model(parts.mllm, parts.sam, seed=0)
    samples = [SegSample(image=i, query=t, is_sentence=s, mask=m) for i, t, s, m in zip(images, texts, sentences, masks)]
    features = parts.sam.encode_batch(images)
    batch = make_batch(model, samples, random.Random(0), features=features)
    optimizer = make_optimizer(model, lr=1e-4)
    seconds, all_seconds = _median_seconds(lambda: seg_token_train_step(model, batch, optimizer), repeats)
    return {"available": True, "step_seconds": seconds, "all_step_seconds": all_seconds,
            "trainable_parameters": sum(p.numel() for p in model.trainable_parameters().values())}


def realistic_components(seed: int = 0, device: str = "cpu") -> Any:
    """Components at a realistic size, random weights: a LLaVA-shaped MLLM whose LLM has Qwen2-0.5B's shape
    (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocabulary 151,936: ~0.6 B parameters with the
    untied LM head) behind a CLIP-ViT-B/16-shaped tower (224 px, 196 image tokens), SAM ViT-B at 1024 px, and an
    open_clip ViT-L/14 text tower; adapters as the real presets size them."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from llavaseg.models.components import Components, build_sam, build_text_encoder, new_adapters
    from llavaseg.models.mllm import FrozenMLLM
    from llavaseg.models.tiny_llava import IMAGE_TOKEN, TinyLlavaSpec, build_tiny_processor, tiny_vocabulary

    spec = TinyLlavaSpec(image_size=224, patch_size=16, vision_hidden=768, vision_layers=12, vision_heads=12,
                         text_hidden=896, text_layers=24, text_heads=14, text_intermediate=4864, max_positions=2048)
    processor = build_tiny_processor(tiny_vocabulary(), spec)
    tokenizer = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, image_size=224, patch_size=16, projection_dim=768),
        text_config=LlamaConfig(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048,
                                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=spec.num_image_tokens,
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval().to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    mllm = FrozenMLLM(model, processor, name="llava-qwen2-0.5b-shaped-random", max_new_tokens=16)
    sam = build_sam("random:vit_b", device=device)
    text_encoder = build_text_encoder("ViT-L-14", None, device=device)
    adapters = new_adapters(sam, text_encoder, dim=256, heads=8, scales=(8, 4, 2, 2, 1), seed=seed)
    return Components(mllm, sam, text_encoder, adapters, untrained=("mllm", "sam", "clip", "adapters"))


def inference_costs(parts: Any, prompts: Any, images: list[np.ndarray], texts: list[str]) -> dict[str, Any]:
    """Seconds per query of each route on these components (one image and query at a time, after a warm-up;
    untrained parts are random, so only the cost means anything), and peak RSS after each."""
    import resource

    from llavaseg.routes.registry import RouteContext, build_route

    costs: dict[str, Any] = {}
    for name in ("llavaseg", "llavaseg-verify", "seg-token", "training-free"):
        context = RouteContext(components=parts, prompts=prompts, with_answer=True,
                               options={"constrained": False} if name == "llavaseg-verify" else {})
        route = build_route(name, context)
        route(images[:1], texts[:1])  # warm-up (allocations, first-call work)
        parts.sam.clear_cache()
        start = time.perf_counter()
        for image, text in zip(images, texts):
            route([image], [text])
        costs[name] = {"seconds_per_query": (time.perf_counter() - start) / len(images),
                       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return costs


def published_scale_parameters() -> dict[str, Any]:
    """Trainable parameters at published scale (LLaVA-7B + SAM ViT-H), counted from the architectures.

    Adapters: the ``llava-1.5-7b`` preset's adapters (CLIP ViT-L/14 text width 768, ViT-H levels 1280, 4
    levels, 64x64 grid), built here. ``<SEG>`` (LISA-7B, ``docs/lisa.md`` \u00a72): LoRA r=8 on q/v of 32 layers of width
    4096, full ``embed_tokens`` and ``lm_head`` over LISA's vocabulary (32000 + [SEG] + <im_start>/<im_end>),
    ``text_hidden_fcs`` 4096->4096->256 and SAM's mask decoder (built here).
    """
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    from llavaseg.models.adapters import AdapterConfig, MultiScaleAdapters
    from llavaseg.models.presets import PRESETS

    preset = PRESETS["llava-1.5-7b"]
    adapters = MultiScaleAdapters(AdapterConfig(text_dim=768, level_dim=1280, prompt_dim=256, grid=64, num_levels=4,
                                                dim=preset.adapter_dim, heads=preset.adapter_heads,
                                                scales=preset.adapter_scales))
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256,
                          mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    hidden, layers, vocab, rank = 4096, 32, 32003, 8
    parts = {"lora_qv": layers * 2 * (hidden * rank + rank * hidden), "embed_tokens": vocab * hidden,
             "lm_head": vocab * hidden, "text_hidden_fcs": hidden * hidden + hidden + hidden * 256 + 256,
             "mask_decoder": sum(p.numel() for p in decoder.parameters())}
    seg = sum(parts.values())
    return {"adapter_trainable_parameters": adapters.num_parameters(), "seg_token_trainable_parameters": seg,
            "seg_token_parts": parts, "ratio_seg_over_adapter": seg / adapters.num_parameters()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="tiny (random weights) or tiny-world (shipped weights)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: results/train_step[-realistic].json)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-inference", action="store_true", help="realistic size: skip the per-route inference costs")
    parser.add_argument("--compile", action="store_true",
                        help="also time the cached adapter step with torch.compile'd adapters (does it pay here?)")
    parser.add_argument("--size", choices=["preset", "realistic"], default="preset",
                        help="realistic: a LLaVA-shaped model with a ~0.5 B-parameter LLM (random weights), "
                             "SAM ViT-B at 1024 px, an open_clip ViT-L/14 text tower")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = RESULTS.with_name("train_step-realistic.json" if args.size == "realistic" else RESULTS.name)
    torch.set_num_threads(args.threads)

    from llavaseg.models.components import build_components
    from llavaseg.models.presets import get_preset
    from llavaseg.prompting import PromptSet

    if args.size == "realistic":
        parts = realistic_components(args.seed, args.device)
    else:
        parts = build_components(get_preset(args.preset).spec(), device=args.device, allow_untrained=True)
        if parts.adapters is None or "adapters" not in parts.untrained:  # a fresh start, as training begins
            from llavaseg.models.components import new_adapters

            spec = get_preset(args.preset)
            parts.adapters = new_adapters(parts.sam, parts.text_encoder, dim=spec.adapter_dim,
                                          heads=spec.adapter_heads, scales=spec.adapter_scales, seed=args.seed)
    prompts = PromptSet.load()
    images, texts, sentences, masks, _ = _batch(args.batch_size, args.seed)

    import resource

    def rss_mb() -> float:  # the process's peak so far (monotone): the halves run in this order on purpose
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rss_models = rss_mb()
    adapter = adapter_half(parts, prompts, images, texts, sentences, masks, repeats=args.repeats,
                           compile_check=args.compile)
    adapter["peak_rss_mb_after"] = rss_mb()
    seg = seg_token_half(parts, images, texts, sentences, masks, repeats=args.repeats)
    seg["peak_rss_mb_after"] = rss_mb()
    if args.device.startswith("cuda"):
        seg["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result: dict[str, Any] = {
        "preset": args.preset if args.size == "preset" else "realistic (random weights)",
        "size": args.size, "batch_size": args.batch_size, "repeats": args.repeats, "threads": args.threads,
        "image_size": list(images[0].shape[:2]), "adapter": adapter, "seg_token": seg,
        "peak_rss_mb_models_loaded": rss_models,
        "published_scale": published_scale_parameters(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "notes": "median wall time per optimiser step after one warm-up; CPU shared with other jobs, "
                 "so absolute times are noisy, ratios less so",
    }
    if args.size == "realistic" and not args.no_inference:
        parts.untrained = (*parts.untrained, "seg_token")
        result["inference"] = inference_costs(parts, prompts, images[:2], texts[:2])
        for name, cost in result["inference"].items():
            print(f"inference {name:16s} {cost['seconds_per_query']:8.2f} s/query")
    if seg.get("available"):
        result["wall_time_ratio_seg_over_adapter_cached"] = seg["step_seconds"] / adapter["step_seconds_cached"]
        result["wall_time_ratio_seg_over_adapter_uncached"] = seg["step_seconds"] / adapter["step_seconds_uncached"]
        result["trainable_parameter_ratio_seg_over_adapter"] = seg["trainable_parameters"] / adapter["trainable_parameters"]

    rows = [("adapter step, cached features", adapter["step_seconds_cached"], adapter["trainable_parameters"]),
            ("adapter step, frozen models run each step", adapter["step_seconds_uncached"],
             adapter["trainable_parameters"])]
    if seg.get("available"):
        rows.append(("<SEG> token step (LoRA + decoder)", seg["step_seconds"], seg["trainable_parameters"]))
    print(f"\npreset {args.preset}, batch {args.batch_size}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'step':44s} {'ms/step':>10s} {'trainable params':>17s}")
    for name, seconds, params in rows:
        print(f"{name:44s} {1000 * seconds:10.1f} {params:17,d}")
    if seg.get("available"):
        print(f"\n<SEG> / adapter (cached): wall time x{result['wall_time_ratio_seg_over_adapter_cached']:.1f}, "
              f"trainable parameters x{result['trainable_parameter_ratio_seg_over_adapter']:.1f}")
    else:
        print(f"\n<SEG> half not measured: {seg['reason']}")
    scale = result["published_scale"]
    print(f"at published scale (LLaVA-7B + SAM ViT-H): adapters {scale['adapter_trainable_parameters']:,} vs "
          f"<SEG> {scale['seg_token_trainable_parameters']:,} trainable parameters "
          f"(x{scale['ratio_seg_over_adapter']:.0f})")
    if "torch_compile_cached_step" in adapter:
        check = adapter["torch_compile_cached_step"]
        print(f"torch.compile'd adapters, cached step: {1000 * check['compiled_step_seconds']:.1f} ms vs eager "
              f"{1000 * check['eager_step_seconds']:.1f} ms (x{check['speedup']:.2f}; first call "
              f"{check['first_compiled_call_seconds']:.1f} s)")
    print(f"cache build: {adapter['cache_build_seconds']:.2f} s for {args.batch_size} queries "
          f"({1000 * adapter['cache_build_seconds_per_query']:.0f} ms/query, MLLM stages + SAM + text encoder)")
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
