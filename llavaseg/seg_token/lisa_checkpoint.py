"""Load a published LISA checkpoint directory (e.g. ``xinlai/LISA-7B-v1``) as a :class:`SegTokenModel`.

What LISA publishes
    LISA v1 is built on **LLaVA v1** ("LLaVA-Lightning-7B-v1-1": Vicuna/LLaMA-1 + CLIP ViT-L/14 at 224 px, a single
    ``Linear`` projector, ``<im_start>``/``<im_end>`` around the image) with the *old* ``llava`` code base
    (``LlavaLlamaForCausalLM``), **not** llava-hf / transformers' ``LlavaForConditionalGeneration``. Its release
    directories are written by ``merge_lora_weights_and_save_hf_model.py``: LoRA merged into the LLM, the CLIP
    vision tower *removed* (``if "vision_tower" not in k``), the tokenizer (with ``[SEG]``, ``<im_start>``,
    ``<im_end>``) saved alongside, ``config.json`` with LLaMA fields plus ``mm_*``/``out_dim``.

How keys map (implemented by :func:`map_lisa_state_dict`, tested on a generated tiny state dict)

    ======================================================  =================================================
    LISA key                                                here
    ======================================================  =================================================
    ``model.embed_tokens.weight``                            ``model.language_model.embed_tokens.weight``
                                                            (+1 appended row for the ``<image>`` placeholder)
    ``model.layers.{i}.*`` (attention, MLP, norms)           ``model.language_model.layers.{i}.*`` (same names)
    ``model.norm.weight``                                    ``model.language_model.norm.weight``
    ``lm_head.weight``                                       ``lm_head.weight`` (+1 appended row)
    ``model.mm_projector.weight/bias`` (one ``Linear``)      ``multi_modal_projector.linear_1``; ``linear_2`` is
                                                            set to the identity and the activation to
                                                            ``"linear"`` (identity): the same function exactly
    ``model.mm_projector.{0,2}.*`` (LLaVA-1.5 mlp2x_gelu)    ``multi_modal_projector.linear_{1,2}`` (gelu)
    ``model.vision_tower.vision_tower.vision_model.*``       ``model.vision_tower.*`` (only if present; the
                                                            released v1 files omit it, so the CLIP tower is
                                                            loaded from ``vision_tower`` = a local
                                                            ``openai/clip-vit-large-patch14`` directory)
    ``model.text_hidden_fcs.0.{0,2}.*``                      ``text_hidden_fcs.{0,2}.*``
    ``model.visual_model.mask_decoder.*``                    ``mask_decoder.*`` (this model's decoder copy)
    ``model.visual_model.image_encoder.*``, ``prompt_encoder.*``  not loaded: LISA keeps them frozen, so they must
                                                            equal the shared :class:`FrozenSAM` (SAM ViT-H
                                                            ``sam_vit_h_4b8939.pth``) in the saved dtype or
                                                            after rounding both to bf16 (LISA trains in bf16,
                                                            so fp32 copies of its weights hold bf16 values);
                                                            a difference is refused
    ``*.rotary_emb.inv_freq``                                dropped (recomputed buffers)
    anything else                                           reported in ``LisaKeyMapping.unmapped``
    ======================================================  =================================================

How LISA's prompts are tokenised (reproduced exactly; :class:`LisaLlamaTokenizer`)
    LISA runs transformers 4.31 with ``use_fast=False``: the slow ``LlamaTokenizer`` (``legacy=True``, the 4.31
    default and what LISA's saved ``tokenizer_config.json`` says) read from ``tokenizer.model``, under LLaVA's
    ``tokenizer_image_token`` (the prompt is split on ``<image>``, each chunk tokenised with BOS, the BOS of every
    chunk but the first dropped, ``IMAGE_TOKEN_INDEX`` = -200 between chunks). Two 4.31 rules matter:

    * tokens added with ``add_tokens`` (``[SEG]``, ``<im_start>``, ``<im_end>``; plain strings in 4.31, not
      ``AddedToken``) **strip the whitespace on both sides**: ``"USER: <im_start>"`` ends in ``":"``, and
      ``"<im_end>\\n What"`` continues with ``"\u2581What"``: the newline after the image never reaches the model;
    * every text piece between added tokens is a fresh SentencePiece input, so it gets the dummy ``"\u2581"``
      prefix (``"[SEG]."`` is ``[SEG]``, ``"\u2581"``, ``"."``).

    transformers 5's own LLaMA tokenizer (``AutoTokenizer`` on the same folder) keeps those spaces and newline,
    so on LISA's validation prompt it differs at three positions, one of them the token whose hidden state is
    the ``[SEG]`` embedding (``" "`` instead of ``":"``). Here ``<image>`` becomes ``image_seq_length`` placeholder
    ids (a token appended to LISA's vocabulary) instead of one -200: LISA's model splices its 256 CLIP features
    in place of the -200, transformers scatters them into the placeholder rows, so the embedded
    sequences are the same and the hidden states align 1:1 with ``input_ids`` (no 255-pad needed).

Prompt text
    ``conv_llava_v1`` of LISA's ``model/llava/conversation.py`` (system line "A chat between a curious human
    ...", ``USER``/``ASSISTANT``, sep ``" "``, sep2 ``"</s>"``) with the user turn of LISA's ``ValDataset``:
    ``"<im_start><image><im_end>\\n {text}"``, its leading space included. ``chat.py`` writes ``"\\n" + text``
    (no space); under the rules above both give the same ids whenever ``<im_end>`` follows the image (every v1
    release); for a folder with ``mm_use_im_start_end: false`` the space changes the first piece
    (``"\u2581What"`` vs ``"What"``) and the validation text, which produced LISA's numbers, is followed.

What does not carry over exactly
    * Vision features use CLIP layer ``mm_vision_select_layer`` (-2) without the CLS token, as LISA's
      ``CLIPVisionTower`` (``select_feature="patch"``) = transformers' ``vision_feature_select_strategy="default"``;
      another ``mm_vision_select_feature`` is refused.
    * LISA runs in bf16 on a GPU; here the dtype is the caller's (fp32 on CPU by default).
    * Loading needs the real weights locally (about 15 GB for 7B in bf16, plus SAM ViT-H and CLIP ViT-L/14);
      released ``pytorch_model*.bin`` shards are read with ``torch.load(weights_only=True)``. Reading
      ``tokenizer.model`` needs ``sentencepiece`` (the ``lisa`` extra).
    * LISA v1 checkpoints were trained on ReasonSeg train+val: never report val numbers with them (``docs/lisa.md`` §4).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llavaseg.errors import CheckpointMismatchError, UnsupportedError
from llavaseg.models.common import (
    WEIGHT_FILE_ERRORS,
    state_dict_mismatch,
    weights_error,
)
from llavaseg.models.sam import FrozenSAM
from llavaseg.seg_token.lisa_tokenizer import (
    IM_END,
    IM_START,
    IMAGE,
    IMAGE_TOKEN_INDEX,
    LisaLlamaTokenizer,
    lisa_input_ids,
    lisa_tokenizer,
)
from llavaseg.seg_token.model import (
    SegTokenConfig,
    SegTokenModel,
    text_hidden_fcs,
)
from llavaseg.seg_token.prompts import SEG_TOKEN

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
"""``conv_llava_v1.system`` (LISA's ``--conv_type`` default ``llava_v1``; "curious user" is ``conv_vicuna_v1``)."""



def llava_v1_chat_template(use_im_start_end: bool) -> str:
    """LISA's ``conv_llava_v1`` as a chat template for ``LlavaProcessor``: ``{system} USER: {user} ASSISTANT:
    {answer}</s>USER: ...`` (``get_prompt()`` of ``SeparatorStyle.TWO``, sep " ", sep2 "</s>"), the user turn written
    as LISA's ``ValDataset`` writes it, ``<image>\\n {text}`` (see the module docstring for why that equals
    ``chat.py``'s ``<image>\\n{text}`` under LISA's tokenizer).

    Every literal is emitted as a Jinja expression: transformers renders templates with ``lstrip_blocks``, which
    would eat the space after ``"\\n"`` if it stood as raw text before a ``{% ... %}`` tag."""
    image = json.dumps((f"{IM_START}{IMAGE}{IM_END}" if use_im_start_end else IMAGE) + "\n ")
    texts = ("{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
             "{% endfor %}")
    return (
        "{{ " + json.dumps(LLAVA_V1_SYSTEM + " ") + " }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ " + image + " }}{% endif %}{% endfor %}"
        + texts + "{{ ' ' }}"
        "{% else %}{{ 'ASSISTANT: ' }}" + texts + "{{ '</s>' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )


@dataclass
class LisaKeyMapping:
    """A LISA state dict sorted into what goes where (see the module docstring's table)."""

    llava: dict[str, torch.Tensor] = field(default_factory=dict)
    text_hidden_fcs: dict[str, torch.Tensor] = field(default_factory=dict)
    mask_decoder: dict[str, torch.Tensor] = field(default_factory=dict)
    frozen_sam: dict[str, torch.Tensor] = field(default_factory=dict)  # image_encoder.* / prompt_encoder.*
    projector: str = "none"  # "linear" (LLaVA v1), "mlp2x_gelu" (LLaVA-1.5 based) or "none"
    has_vision_tower: bool = False
    unmapped: dict[str, str] = field(default_factory=dict)  # key -> reason


_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^model\.(embed_tokens\..+)$"), "llava:model.language_model.{0}"),
    (re.compile(r"^model\.(layers\.\d+\..+)$"), "llava:model.language_model.{0}"),
    (re.compile(r"^model\.(norm\..+)$"), "llava:model.language_model.{0}"),
    (re.compile(r"^(lm_head\..+)$"), "llava:{0}"),
    (re.compile(r"^model\.mm_projector\.(weight|bias)$"), "llava:model.multi_modal_projector.linear_1.{0}"),
    (re.compile(r"^model\.mm_projector\.0\.(weight|bias)$"), "llava:model.multi_modal_projector.linear_1.{0}"),
    (re.compile(r"^model\.mm_projector\.2\.(weight|bias)$"), "llava:model.multi_modal_projector.linear_2.{0}"),
    (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\.(.+)$"), "llava:model.vision_tower.{0}"),
    (re.compile(r"^model\.text_hidden_fcs\.0\.(\d+\.(?:weight|bias))$"), "fcs:{0}"),
    (re.compile(r"^model\.visual_model\.mask_decoder\.(.+)$"), "decoder:{0}"),
    (re.compile(r"^model\.visual_model\.((?:image_encoder|prompt_encoder)\..+)$"), "sam:{0}"),
]


def map_lisa_state_dict(state: dict[str, torch.Tensor]) -> LisaKeyMapping:
    """Sort LISA checkpoint tensors by destination; nothing is dropped silently (see ``unmapped``)."""
    mapping = LisaKeyMapping()
    for key, tensor in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            mapping.unmapped[key] = "recomputed buffer"
            continue
        for pattern, target in _RULES:
            match = pattern.match(key)
            if match is None:
                continue
            kind, template = target.split(":", 1)
            name = template.format(*match.groups())
            {"llava": mapping.llava, "fcs": mapping.text_hidden_fcs, "decoder": mapping.mask_decoder,
             "sam": mapping.frozen_sam}[kind][name] = tensor
            break
        else:
            mapping.unmapped[key] = "no counterpart in transformers' LLaVA or this route"
    if "model.mm_projector.weight" in state:
        mapping.projector = "linear"
        hidden = state["model.mm_projector.weight"].shape[0]
        mapping.llava["model.multi_modal_projector.linear_2.weight"] = torch.eye(
            hidden, dtype=state["model.mm_projector.weight"].dtype)
        mapping.llava["model.multi_modal_projector.linear_2.bias"] = torch.zeros(
            hidden, dtype=state["model.mm_projector.weight"].dtype)
    elif "model.mm_projector.0.weight" in state:
        mapping.projector = "mlp2x_gelu"
    mapping.has_vision_tower = any(k.startswith("model.vision_tower.") for k in mapping.llava)
    return mapping


# ----------------------------------------------------------------------------------------------- reading
def read_lisa_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF-format directory: ``*.safetensors`` (preferred) or ``pytorch_model*.bin``."""
    from safetensors.torch import load_file

    shards = sorted(directory.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if shards:
        for shard in shards:
            try:
                state.update(load_file(str(shard)))
            except WEIGHT_FILE_ERRORS as exc:
                raise weights_error("LISA weights shard", shard, exc) from None
        return state
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointMismatchError(f"{directory} holds no *.safetensors or pytorch_model*.bin weights")
    for shard in bins:
        try:
            part = torch.load(str(shard), map_location="cpu", weights_only=True)
        except WEIGHT_FILE_ERRORS as exc:
            raise weights_error("LISA weights shard", shard, exc) from None
        state.update(part)
    return state


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointMismatchError(f"{directory} is not a LISA checkpoint directory (no config.json)")
    config = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in config]
    if missing or "out_dim" not in config:
        raise CheckpointMismatchError(f"{path} is not a LISA config (missing {', '.join(missing or ['out_dim'])})")
    return config


def _sam_tensor_problem(tensor: torch.Tensor, reference: torch.Tensor | None) -> str | None:
    """Why a frozen-SAM tensor of a LISA checkpoint is not the shared SAM's, or None when it is.

    LISA trains in bf16, so its saved ``visual_model`` tensors are SAM ViT-H rounded to bf16: equal in the
    saved dtype (a bf16 file) or, for an fp32/fp16 copy of those weights, only after rounding both to bf16."""
    if reference is None:
        return "has no counterpart in"
    if tuple(reference.shape) != tuple(tensor.shape):
        return f"has shape {tuple(tensor.shape)}, not {tuple(reference.shape)} as in"
    saved, ours = tensor.detach().cpu(), reference.detach().cpu()
    if torch.equal(ours.to(saved.dtype), saved):
        return None
    if saved.is_floating_point() and torch.equal(ours.to(torch.bfloat16), saved.to(torch.bfloat16)):
        return None
    return "differs, even after rounding both to bf16 (LISA's training precision), from"


def _check_frozen_sam(mapping: LisaKeyMapping, sam: FrozenSAM, directory: Path) -> None:
    """Refuse a LISA checkpoint whose frozen SAM image/prompt encoder is not the shared SAM (they are not loaded:
    the shared one is used, so it must be the one LISA was trained with)."""
    reference = sam.sam.state_dict()
    for key, tensor in mapping.frozen_sam.items():
        problem = _sam_tensor_problem(tensor, reference.get(key))
        if problem is not None:
            raise CheckpointMismatchError(
                f"{directory}: LISA's frozen SAM tensor {key} {problem} the shared SAM {sam.name}; "
                "load the SAM LISA was trained with (sam_vit_h_4b8939.pth)")


def _identity(directory: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, str]:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    weights = hashlib.blake2b(digest_size=8)
    for _, tensor in sorted(state.items())[:4]:
        weights.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])
    return {"name": f"lisa:{directory}", "config": hashlib.blake2b(blob, digest_size=8).hexdigest(),
            "weights": weights.hexdigest()}


def _llava_config(config: dict[str, Any], vision_config: Any, tokenizer: Any, image_id: int, projector: str) -> Any:
    """transformers' ``LlavaConfig`` equivalent to a LISA (LLaVA v1) checkpoint's ``config.json``."""
    from transformers import LlamaConfig, LlavaConfig

    text_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config["hidden_size"],
        intermediate_size=config.get("intermediate_size", 4 * config["hidden_size"]),
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6), hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=config.get("max_position_embeddings", config.get("max_sequence_length", 2048)),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    grid = vision_config.image_size // vision_config.patch_size
    return LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_id,
        image_seq_length=grid * grid, vision_feature_select_strategy="default",
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
        projector_hidden_act="linear" if projector == "linear" else "gelu", multimodal_projector_bias=True)


def _llava_model(directory: Path, mapping: LisaKeyMapping, llava_config: Any, clip: Any, dtype: torch.dtype) -> Any:
    """transformers' ``LlavaForConditionalGeneration`` filled with LISA's (mapped) weights, strictly."""
    from accelerate import init_empty_weights
    from transformers import LlavaForConditionalGeneration

    llava_state = {key: value.to(dtype) for key, value in mapping.llava.items()}
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key not in llava_state:
            raise CheckpointMismatchError(f"{directory}: missing LISA tensor for {key}")
        rows = llava_state[key]
        # The <image> row is never read (its embedding is overwritten by image features; it is never a target).
        llava_state[key] = torch.cat([rows, rows.mean(0, keepdim=True)])
    if not mapping.has_vision_tower:
        llava_state.update({f"model.vision_tower.{k}": v for k, v in clip.state_dict().items()})
    with init_empty_weights():
        llava = LlavaForConditionalGeneration(llava_config)
    problem = state_dict_mismatch(llava.state_dict(), llava_state)
    if problem:
        raise CheckpointMismatchError(f"{directory}: LISA weights do not fill transformers' LLaVA: {problem}")
    llava.load_state_dict(llava_state, assign=True, strict=True)
    return llava.to(dtype).eval()


def _check_lisa_parts(directory: Path, config: dict[str, Any], mapping: LisaKeyMapping, sam: FrozenSAM) -> None:
    """Refuse folders that are not LISA releases this loader reproduces, before any model is built."""
    if config["out_dim"] != sam.prompt_dim:
        raise CheckpointMismatchError(f"{directory}: out_dim {config['out_dim']} but SAM prompts are {sam.prompt_dim}-d")
    if mapping.projector == "none" or not mapping.text_hidden_fcs or not mapping.mask_decoder:
        raise CheckpointMismatchError(f"{directory}: not a LISA checkpoint (projector, text_hidden_fcs or "
                                      "visual_model.mask_decoder missing)")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise UnsupportedError(f"{directory}: mm_vision_select_feature={feature!r}; only LISA's 'patch' (CLIP "
                               "features without CLS) is reproduced")
    _check_frozen_sam(mapping, sam, directory)


def _lisa_processor(config: dict[str, Any], vision_tower: str | Path, clip: Any, tokenizer: Any) -> Any:
    """``LlavaProcessor`` with LISA's CLIP preprocessing, tokenizer and ``conv_llava_v1`` template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    return LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(str(vision_tower)),
                          tokenizer=tokenizer, patch_size=clip.config.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=llava_v1_chat_template(bool(config.get("mm_use_im_start_end", True))),
                          image_token=IMAGE)


def _mask_parts(directory: Path, config: dict[str, Any], mapping: LisaKeyMapping, sam: FrozenSAM
                ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """LISA's ``text_hidden_fcs`` and fine-tuned mask decoder (a copy of the shared SAM's, filled)."""
    mlp = text_hidden_fcs(config["hidden_size"], config["out_dim"])
    try:
        mlp.load_state_dict(mapping.text_hidden_fcs)
    except RuntimeError as exc:
        raise CheckpointMismatchError(f"{directory}: LISA text_hidden_fcs does not fit hidden size "
                                      f"{config['hidden_size']}: {str(exc).splitlines()[0]}") from None
    decoder = copy.deepcopy(sam.sam.mask_decoder)
    try:
        decoder.load_state_dict(mapping.mask_decoder)
    except RuntimeError as exc:
        raise CheckpointMismatchError(f"{directory}: LISA mask decoder does not fit SAM {sam.name}: "
                                      f"{str(exc).splitlines()[0]}") from None
    return mlp, decoder


def load_lisa_checkpoint(directory: str | Path, vision_tower: str | Path, sam: FrozenSAM, *,
                         dtype: torch.dtype = torch.float32) -> SegTokenModel:
    """Build a :class:`SegTokenModel` (no LoRA: LISA's is merged) from a LISA release directory.

    ``vision_tower`` is a local CLIP vision directory (``openai/clip-vit-large-patch14`` for LISA v1) with its
    image processor; ``sam`` must be the SAM LISA was trained with (its frozen encoder is shared, not loaded).
    """
    from transformers import CLIPVisionModel

    directory = Path(directory).expanduser()
    if getattr(sam, "family", "sam") != "sam":
        raise UnsupportedError(f"{directory}: LISA releases were trained with SAM ViT-H and carry its mask decoder; "
                               f"they cannot drive {sam.name} ({sam.family}); pass --sam sam_vit_h_4b8939.pth")
    config = _read_config(directory)
    state = read_lisa_state_dict(directory)
    mapping = map_lisa_state_dict(state)
    _check_lisa_parts(directory, config, mapping, sam)
    tokenizer, seg_id, image_id = lisa_tokenizer(directory, config["vocab_size"],
                                                  bool(config.get("mm_use_im_start_end", True)))
    clip = CLIPVisionModel.from_pretrained(str(vision_tower), dtype=dtype)
    llava = _llava_model(directory, mapping, _llava_config(config, clip.config, tokenizer, image_id,
                                                           mapping.projector), clip, dtype)
    llava.generation_config.pad_token_id = tokenizer.pad_token_id
    llava.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = _lisa_processor(config, vision_tower, clip, tokenizer)
    mlp, decoder = _mask_parts(directory, config, mapping, sam)
    seg_config = SegTokenConfig(seg_token=SEG_TOKEN, seg_token_id=seg_id, base_vocab_size=seg_id,
                                vocab_size=len(tokenizer), hidden_size=config["hidden_size"],
                                prompt_dim=config["out_dim"], lora=None, base_mllm=_identity(directory, config, state),
                                sam=sam.identity(), source=f"lisa:{directory}")
    model = SegTokenModel(llava, processor, mlp.to(dtype), decoder.to(dtype), sam, seg_config)
    model.set_trainable()
    return model.eval()


__all__ = ["IMAGE_TOKEN_INDEX", "LLAVA_V1_SYSTEM", "LisaKeyMapping", "LisaLlamaTokenizer", "lisa_input_ids",
           "llava_v1_chat_template", "load_lisa_checkpoint", "map_lisa_state_dict", "read_lisa_state_dict"]
