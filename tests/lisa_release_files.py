"""A tiny LISA release folder in LISA's exact saved layout, and LISA's own prompt tokenisation as a reference.

What ``merge_lora_weights_and_save_hf_model.py`` of dvlab-research/LISA writes (transformers 4.31,
``save_pretrained`` without safetensors, bf16): ``pytorch_model-0000i-of-0000n.bin`` shards with
``pytorch_model.bin.index.json``, ``config.json`` (LLaMA fields, LLaVA's ``mm_*`` and LISA's ``out_dim``/
``train_mask_decoder``), ``generation_config.json`` and the slow tokenizer: ``tokenizer.model``,
``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json`` (``[SEG]``, ``<im_start>``,
``<im_end>``); no ``tokenizer.json``, no CLIP tower. The tokenizer JSON files below are what transformers 4.31.0
wrote for a LLaMA tokenizer after LISA's ``pad_token = unk_token``, ``add_tokens("[SEG]")`` and
``add_tokens([<im_start>, <im_end>], special_tokens=True)`` (recorded once with 4.31.0 installed).

The SentencePiece model is trained here with LLaMA's settings (BPE, byte fallback, split digits, identity
normalisation, dummy prefix, whitespace kept; unk 0, bos 1, eos 2, no pad) on a few sentences of LISA's prompts.

:func:`tokenizer_image_token` is LISA's ``model/llava/mm_utils.py`` function over :func:`slow_llama_ids`, a plain
rendering of transformers 4.31's slow ``LlamaTokenizer.__call__`` (``legacy=True``). Both were checked against
transformers 4.31.0 itself on 3003 fuzzed prompts (added tokens, ``<image>``, spaces, newlines, tabs, ``▁``): 0
differences in ids or decoded text.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch

SEG, IM_START, IM_END, IMAGE = "[SEG]", "<im_start>", "<im_end>", "<image>"
IMAGE_TOKEN_INDEX = -200
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
"""``conv_llava_v1.system`` in LISA's ``model/llava/conversation.py``."""

SENTENCES = [
    SYSTEM,
    "USER: What is the red circle in this image? Please output segmentation mask. ASSISTANT: Sure, it is [SEG].",
    "Can you segment the blue square in this image? Please respond with segmentation mask.",
    "the green triangle at the top left of the small object which is large",
    "It is. Sure, the segmentation result is. 0 1 2 3 4 5 6 7 8 9 ?!",
]


def train_sentencepiece() -> bytes:
    """A tiny LLaMA-style SentencePiece model (700 pieces: 3 controls, 256 bytes, merges and characters)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=model, model_type="bpe", vocab_size=700,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    return model.getvalue()


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_lisa_tokenizer(folder: Path, model: bytes, n_pieces: int) -> None:
    """The four tokenizer files of a LISA release, as transformers 4.31.0 saves them."""
    (folder / "tokenizer.model").write_bytes(model)
    added = {SEG: n_pieces, IM_START: n_pieces + 1, IM_END: n_pieces + 2}
    (folder / "added_tokens.json").write_text(json.dumps(dict(sorted(added.items())), indent=2))
    specials = {"bos_token": _added_token("<s>"), "eos_token": _added_token("</s>"), "pad_token": "<unk>",
                "unk_token": _added_token("<unk>")}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {"add_bos_token": True, "add_eos_token": False,
              "bos_token": {"__type": "AddedToken", **_added_token("<s>")}, "clean_up_tokenization_spaces": False,
              "eos_token": {"__type": "AddedToken", **_added_token("</s>")}, "legacy": True,
              "model_max_length": 512, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
              "tokenizer_class": "LlamaTokenizer", "unk_token": {"__type": "AddedToken", **_added_token("<unk>")}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def lisa_config(*, hidden: int, layers: int, heads: int, intermediate: int, vision: int, vocab: int,
                out_dim: int, im_start_end: bool = True) -> dict:
    """``config.json`` as LISA's merge script leaves it (LlavaConfig of LLaVA v1 + LISA's fields)."""
    return {
        "architectures": ["LISAForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "freeze_mm_mlp_adapter": True, "hidden_act": "silu", "hidden_size": hidden, "image_aspect_ratio": "square",
        "image_grid_pinpoints": None, "initializer_range": 0.02, "intermediate_size": intermediate,
        "max_position_embeddings": 2048, "max_sequence_length": 2048, "mm_hidden_size": vision,
        "mm_use_im_patch_token": False, "mm_use_im_start_end": im_start_end, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14", "model_type": "llava",
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": heads,
        "out_dim": out_dim, "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "train_mask_decoder": True,
        "transformers_version": "4.31.0", "tune_mm_mlp_adapter": False, "use_cache": False, "use_mm_proj": True,
        "vision_tower": "openai/clip-vit-large-patch14", "vocab_size": vocab,
    }


def round_to_bf16_(module: torch.nn.Module) -> torch.nn.Module:
    """Round a module's weights to bf16 values in place (kept fp32): what LISA's bf16 training leaves."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.bfloat16).float())
    return module


def lisa_state_dict(llama: torch.nn.Module, projector: torch.nn.Linear, fcs: torch.nn.Module, sam,
                    decoder_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LISAForCausalLM's ``state_dict`` names (4.31 ``LlamaForCausalLM`` + LISA's modules), vision tower removed."""
    state = {k: v.detach().clone() for k, v in llama.state_dict().items()}
    head_dim = llama.config.hidden_size // llama.config.num_attention_heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for layer in range(llama.config.num_hidden_layers):  # 4.31 saved the rotary buffer of every layer
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    state["model.mm_projector.weight"] = projector.weight.detach().clone()
    state["model.mm_projector.bias"] = projector.bias.detach().clone()
    state.update({f"model.text_hidden_fcs.0.{k}": v.detach().clone() for k, v in fcs.state_dict().items()})
    for part in ("image_encoder", "prompt_encoder"):
        state.update({f"model.visual_model.{part}.{k}": v.detach().clone()
                      for k, v in getattr(sam.sam, part).state_dict().items()})
    state.update({f"model.visual_model.mask_decoder.{k}": v.detach().clone() for k, v in decoder_state.items()})
    return state


def write_lisa_weights(folder: Path, state: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.bfloat16,
                       shards: int = 2) -> None:
    """``pytorch_model-0000i-of-0000n.bin`` shards + ``pytorch_model.bin.index.json`` (4.31 ``save_pretrained``)."""
    keys = sorted(state)
    per = math.ceil(len(keys) / shards)
    weight_map, total = {}, 0
    for index in range(shards):
        name = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k].to(dtype).contiguous() for k in keys[index * per:(index + 1) * per]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index_file, indent=2))


def write_lisa_release(folder: Path, state: dict[str, torch.Tensor], config: dict, model: bytes, *,
                       dtype: torch.dtype = torch.bfloat16) -> Path:
    """A complete release folder (weights, configs, slow tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_lisa_weights(folder, state, dtype=dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.31.0"}, indent=2))
    write_lisa_tokenizer(folder, model, config["vocab_size"] - 3)
    return folder


# ------------------------------------------------------------------------------ LISA's tokenisation (reference)
def slow_llama_ids(text: str, sp, added: dict[str, int], *, bos: bool = True) -> list[int]:
    """transformers 4.31 ``LlamaTokenizer(legacy=True)(text).input_ids`` for a LISA tokenizer: ``<s>``, ``</s>``,
    ``<unk>`` (``AddedToken``, no stripping) and the ``added`` tokens (plain strings: whitespace stripped on both
    sides) are cut out leftmost-longest; every other piece goes through SentencePiece on its own."""
    controls = {"<s>": 1, "</s>": 2, "<unk>": 0}
    names = sorted([*controls, *added], key=len, reverse=True)
    pieces: list[str] = []
    rest = text
    while rest:
        hits = [(rest.find(name), -len(name), name) for name in names if name in rest]
        if not hits:
            pieces.append(rest)
            break
        at, _, name = min(hits)
        pieces += [rest[:at], name]
        rest = rest[at + len(name):]
    for i, piece in enumerate(pieces):
        if piece in added:
            if i + 1 < len(pieces):
                pieces[i + 1] = pieces[i + 1].lstrip()
            if i > 0:
                pieces[i - 1] = pieces[i - 1].rstrip()
    ids = [1] if bos else []
    for piece in pieces:
        if piece in controls or piece in added:
            ids.append(controls.get(piece, added.get(piece)))
        elif piece:
            ids += sp.encode(piece)
    return ids


def tokenizer_image_token(prompt: str, encode) -> list[int]:
    """LISA's ``tokenizer_image_token`` (``model/llava/mm_utils.py``): chunks around ``<image>`` encoded with BOS,
    the first chunk's BOS kept, the others' dropped, ``IMAGE_TOKEN_INDEX`` between chunks."""
    chunks = [encode(chunk) for chunk in prompt.split(IMAGE)]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == 1 else 0
    ids = [1] if offset else []
    for index, chunk in enumerate(chunks):
        if index:
            ids.append(IMAGE_TOKEN_INDEX)
        ids += chunk[offset:]
    return ids


def lisa_val_prompt(text: str, *, is_sentence: bool, im_start_end: bool = True) -> str:
    """LISA's ``ValDataset`` conversation for ``text`` (``conv_llava_v1.get_prompt()``; ``collate_fn`` then wraps
    ``<image>`` in ``<im_start>``/``<im_end>``)."""
    question = (f"{IMAGE}\n {text} Please output segmentation mask." if is_sentence
                else f"{IMAGE}\n What is {text} in this image? Please output segmentation mask.")
    prompt = f"{SYSTEM} USER: {question} ASSISTANT: [SEG].</s>"
    return prompt.replace(IMAGE, IM_START + IMAGE + IM_END) if im_start_end else prompt


def lisa_chat_prompt(text: str, *, im_start_end: bool = True) -> str:
    """LISA's ``chat.py`` prompt for ``text`` (``<image>\\n`` + text, empty assistant turn)."""
    image = IM_START + IMAGE + IM_END if im_start_end else IMAGE
    return f"{SYSTEM} USER: {image}\n{text} ASSISTANT:"
