"""Loading LISA release checkpoints: key mapping on a tiny state dict written in LISA's naming scheme.

The release folder is built by ``tests/lisa_release_files.py`` in LISA's exact saved layout (bf16 ``.bin``
shards, LISA's ``config.json``, a SentencePiece ``tokenizer.model`` with 4.31's tokenizer files); the end-to-end
tokenisation and ``[SEG]`` checks against LISA's own code paths are in ``tests/test_lisa_release.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lisa_release_files import (
    lisa_config,
    lisa_state_dict,
    round_to_bf16_,
    train_sentencepiece,
    write_lisa_release,
)
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from llavaseg.errors import CheckpointMismatchError
from llavaseg.models.components import build_sam
from llavaseg.seg_token.inference import predict
from llavaseg.seg_token.lisa_checkpoint import load_lisa_checkpoint, map_lisa_state_dict
from llavaseg.seg_token.model import text_hidden_fcs

torch.set_num_threads(1)

HIDDEN, VISION = 32, 24


@pytest.fixture(scope="module")
def lisa(tmp_path_factory):
    """A LISA-format release directory (merged LLM, no vision tower) plus a CLIP vision directory."""
    sentencepiece = pytest.importorskip("sentencepiece")  # the lisa extra: LISA releases hold tokenizer.model
    root = tmp_path_factory.mktemp("lisa")
    sam = build_sam("tiny", None, device="cpu")
    model_bytes = train_sentencepiece()
    vocab = sentencepiece.SentencePieceProcessor(model_proto=model_bytes).get_piece_size() + 3
    torch.manual_seed(0)
    llama = round_to_bf16_(LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048)).eval())
    projector = round_to_bf16_(torch.nn.Linear(VISION, HIDDEN))
    fcs = round_to_bf16_(text_hidden_fcs(HIDDEN, sam.prompt_dim))
    decoder_state = {k: (v + 0.01).to(torch.bfloat16).float()  # "fine-tuned", bf16 as LISA saves it
                     for k, v in sam.sam.mask_decoder.state_dict().items()}
    state = lisa_state_dict(llama, projector, fcs, sam, decoder_state)
    state["model.some_new_thing.weight"] = torch.zeros(2)
    config = lisa_config(hidden=HIDDEN, layers=2, heads=4, intermediate=64, vision=VISION, vocab=vocab,
                         out_dim=sam.prompt_dim)
    checkpoint = write_lisa_release(root / "LISA-tiny", state, config, model_bytes)
    clip_dir = root / "clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=VISION, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(str(clip_dir))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(clip_dir))
    return {"dir": checkpoint, "clip": clip_dir, "sam": sam, "state": state, "llama": llama, "projector": projector,
            "fcs": fcs, "decoder": decoder_state, "vocab": vocab}


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
    assert set(mapping.unmapped) == {"model.layers.0.self_attn.rotary_emb.inv_freq",
                                     "model.layers.1.self_attn.rotary_emb.inv_freq", "model.some_new_thing.weight"}
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
    assert model.seg_token_id == lisa["vocab"] - 3 == tokenizer.convert_tokens_to_ids("[SEG]")
    assert not model.is_lora and model.config.source.startswith("lisa:")
    ids = torch.tensor([tokenizer("USER: What is the red circle? ASSISTANT: It is [SEG].")["input_ids"]])
    with torch.no_grad():
        ours = model.llava(input_ids=ids).logits[0, :, : lisa["vocab"]]
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
    assert prompt == ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                      "helpful, detailed, and polite answers to the human's questions. USER: "
                      "<im_start><image><im_end>\n the red circle ASSISTANT:")
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    result = predict(model, [image], ["the red circle"], protocol="teacher-forced")[0]
    assert result.masks.shape == (1, 40, 60)


def test_lisa_checkpoint_with_another_sam_is_refused(lisa):
    other = build_sam("tiny", None, device="cpu")
    other.sam.image_encoder.neck[0].weight.data += 1.0
    with pytest.raises(CheckpointMismatchError, match="frozen SAM"):
        load_lisa_checkpoint(lisa["dir"], lisa["clip"], other)
