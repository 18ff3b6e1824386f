"""Frozen means frozen: a training step through the whole LLaVASeg path changes the adapters and nothing else."""

from __future__ import annotations

import numpy as np
import torch

from llavaseg.method.segment import adapter_mask_logits, encode_phrases, text_phrases
from llavaseg.method.stages import run_stages
from llavaseg.models.components import build_components
from llavaseg.models.presets import PRESETS
from llavaseg.prompting import PromptSet
from llavaseg.train import mask_loss


def _tiny_world_batch():
    from llavaseg.data.reasonseg import polygons_to_mask
    from llavaseg.tinyworld.generate import iter_scenes

    images, queries, masks = [], [], []
    for scene, image, targets, _ in iter_scenes("train", seed=11, count=2):
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        target = scene.objects[targets[0].target_index]
        images.append(array)
        queries.append(targets[0].text)
        masks.append(polygons_to_mask([{"label": "target", "points": target.polygon}], *array.shape[:2]))
    return images, queries, masks


def test_one_step_updates_adapters_only() -> None:
    torch.set_num_threads(1)
    parts = build_components(PRESETS["tiny"], allow_untrained=True)
    frozen = {"mllm": parts.mllm.model, "sam": parts.sam.sam, "text_encoder": parts.text_encoder.model}
    before = {name: {k: p.detach().clone() for k, p in module.named_parameters()} for name, module in frozen.items()}
    adapters_before = {k: p.detach().clone() for k, p in parts.adapters.named_parameters()}
    images, queries, masks = _tiny_world_batch()
    assert all(m.sum() > 0 for m in masks)

    # the full path, as at inference: MLLM stages -> text encoder -> SAM encoder -> adapters -> SAM decoder
    parts.adapters.train()
    stages = run_stages(parts.mllm, PromptSet.load(), images, queries)
    phrases = [text_phrases(s.description, s.attributes, True, parts.adapters.config.max_text_tokens) for s in stages]
    text, text_mask = encode_phrases(parts.text_encoder, phrases)
    features = parts.sam.encode_batch(images)
    low_res, _ = adapter_mask_logits(parts.adapters, parts.sam, features, text, text_mask)
    logits = [parts.sam.upscale(low_res[i: i + 1], f)[0, 0] for i, f in enumerate(features)]
    assert logits[0].shape == masks[0].shape  # the loss is taken at ground-truth resolution
    loss, _, _ = mask_loss(logits, masks)
    optimizer = torch.optim.AdamW(parts.adapters.parameters(), lr=1e-3)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    for name, module in frozen.items():
        assert not module.training, f"{name} was put in train mode"
        assert all(not m.training for m in module.modules()), name
        for key, parameter in module.named_parameters():
            assert parameter.grad is None, f"{name}.{key} received a gradient"
            assert not parameter.requires_grad, f"{name}.{key} is trainable"
            assert torch.equal(parameter, before[name][key]), f"{name}.{key} changed"
    changed = [k for k, p in parts.adapters.named_parameters() if not torch.equal(p, adapters_before[k])]
    with_grad = [k for k, p in parts.adapters.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) > 0.9 * len(adapters_before)  # gradients reach (nearly) every adapter tensor
    assert set(with_grad) <= set(changed)
