"""Loading LISA release checkpoints: key mapping on a tiny state dict written in LISA's naming scheme."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from llavaseg.errors import CheckpointMismatchError
from llavaseg.models.components import build_sam
from llavaseg.seg_token.inference import predict
from llavaseg.seg_token.lisa_checkpoint import load_lisa_checkpoint, map_lisa_state_dict
from llavaseg.seg_token.model import text_hidden_fcs

torch.set_num_threads(1)

HIDDEN, VISION = 32, 24


def _tokenizer() -> PreTrainedTokenizerFast:
    words = ["<unk>", "<s>", "</s>", "USER", "ASSISTANT", ":", "the", "red", "circle", "is", "It", ".", "What", "?"]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.add_tokens("[SEG]")  # LISA: add_tokens("[SEG]"), then <im_start>/<im_end> as special tokens
    tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module")
def lisa(tmp_path_factory):
    """A LISA-format release directory (merged LLM, no vision tower) plus a CLIP vision directory."""
    root = tmp_path_factory.mktemp("lisa")
    sam = build_sam("tiny", None, device="cpu")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=256)).eval()
    projector = torch.nn.Linear(VISION, HIDDEN)
    fcs = text_hidden_fcs(HIDDEN, sam.prompt_dim)
    decoder_state = {k: v + 0.01 for k, v in sam.sam.mask_decoder.state_dict().items()}  # "fine-tuned"
    state = {k: v.clone() for k, v in llama.state_dict().items()}  # model.embed_tokens / model.layers / lm_head
    state.update({"model.mm_projector.weight": projector.weight.data.clone(),
                  "model.mm_projector.bias": projector.bias.data.clone(),
                  "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),
                  "model.some_new_thing.weight": torch.zeros(2)})
    state.update({f"model.text_hidden_fcs.0.{k}": v.clone() for k, v in fcs.state_dict().items()})
    state.update({f"model.visual_model.mask_decoder.{k}": v for k, v in decoder_state.items()})
    for part in ("image_encoder", "prompt_encoder"):
        state.update({f"model.visual_model.{part}.{k}": v.clone()
                      for k, v in getattr(sam.sam, part).state_dict().items()})
    checkpoint = root / "LISA-tiny"
    checkpoint.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(checkpoint / "model.safetensors"))
    tokenizer.save_pretrained(str(checkpoint))
    (checkpoint / "config.json").write_text(json.dumps({
        "architectures": ["LISAForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": len(tokenizer), "rms_norm_eps": 1e-6,
        "max_sequence_length": 256, "mm_hidden_size": VISION, "mm_use_im_start_end": True,
        "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14", "out_dim": sam.prompt_dim,
        "train_mask_decoder": True}))
    clip_dir = root / "clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=VISION, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(str(clip_dir))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(clip_dir))
    return {"dir": checkpoint, "clip": clip_dir, "sam": sam, "state": state, "llama": llama, "projector": projector,
            "fcs": fcs, "decoder": decoder_state, "tokenizer": tokenizer}


def test_key_mapping_sorts_every_lisa_tensor(lisa):
    mapping = map_lisa_state_dict(lisa["state"])
    assert mapping.projector == "linear" and not mapping.has_vision_tower
    assert torch.equal(mapping.llava["model.language_model.layers.1.mlp.down_proj.weight"],
                       lisa["state"]["model.layers.1.mlp.down_proj.weight"])
    assert "model.language_model.embed_tokens.weight" in mapping.llava and "lm_head.weight" in mapping.llava
    assert torch.equal(mapping.llava["model.multi_modal_projector.linear_1.weight"], lisa["projector"].weight)
    assert torch.equal(mapping.llava["model.multi_modal_projector.linear_2.weight"], torch.eye(HIDDEN))
    assert set(mapping.text_hidden_fcs) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert set(mapping.mask_decoder) == set(lisa["decoder"])
    assert all(k.startswith(("image_encoder.", "prompt_encoder.")) for k in mapping.frozen_sam)
    assert set(mapping.unmapped) == {"model.layers.0.self_attn.rotary_emb.inv_freq", "model.some_new_thing.weight"}
    n_llm = sum(1 for k in lisa["state"] if k.startswith(("model.layers.", "model.embed_tokens", "model.norm",
                                                           "lm_head")) and not k.endswith("inv_freq"))
    assert len(mapping.llava) == n_llm + 4  # + linear_1 (2) + identity linear_2 (2)


def test_mlp2x_gelu_projector_and_vision_tower_keys_map():
    state = {"model.mm_projector.0.weight": torch.zeros(4, 3), "model.mm_projector.2.bias": torch.zeros(4),
             "model.vision_tower.vision_tower.vision_model.post_layernorm.weight": torch.ones(3)}
    mapping = map_lisa_state_dict(state)
    assert mapping.projector == "mlp2x_gelu" and mapping.has_vision_tower
    assert set(mapping.llava) == {"model.multi_modal_projector.linear_1.weight",
                                  "model.multi_modal_projector.linear_2.bias", "model.vision_tower.post_layernorm.weight"}


def test_loaded_lisa_model_reproduces_the_llm_and_segments(lisa):
    model = load_lisa_checkpoint(lisa["dir"], lisa["clip"], lisa["sam"])
    tokenizer = model.tokenizer
    assert model.seg_token_id == lisa["tokenizer"].convert_tokens_to_ids("[SEG]")
    assert not model.is_lora and model.config.source.startswith("lisa:")
    ids = torch.tensor([tokenizer("USER : What is the red circle ? ASSISTANT : It is [SEG] .",
                                  add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ours = model.llava(input_ids=ids).logits[0, :, : len(lisa["tokenizer"])]
        theirs = lisa["llama"](input_ids=ids).logits[0]
    assert torch.allclose(ours, theirs, atol=1e-5)
    features = torch.randn(1, 5, VISION)
    with torch.no_grad():
        assert torch.allclose(model.llava.model.multi_modal_projector(features), lisa["projector"](features), atol=1e-6)
    assert all(torch.equal(v, lisa["fcs"].state_dict()[k]) for k, v in model.text_hidden_fcs.state_dict().items())
    assert all(torch.equal(v, lisa["decoder"][k]) for k, v in model.mask_decoder.state_dict().items())
    prompt = model.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "the red circle"}]}],
        add_generation_prompt=True, tokenize=False)
    assert "USER: <im_start><image><im_end>\nthe red circle ASSISTANT:" in prompt
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    result = predict(model, [image], ["the red circle"], protocol="teacher-forced")[0]
    assert result.masks.shape == (1, 40, 60)


def test_lisa_checkpoint_with_another_sam_is_refused(lisa):
    other = build_sam("tiny", None, device="cpu")
    other.sam.image_encoder.neck[0].weight.data += 1.0
    with pytest.raises(CheckpointMismatchError, match="frozen SAM"):
        load_lisa_checkpoint(lisa["dir"], lisa["clip"], other)
