"""Saving and loading a trained ``[SEG]`` model as a small directory (safetensors + JSON, never pickles).

Layout::

    seg_token.json          SegTokenConfig: [SEG] id, vocabulary sizes, LoRA settings, base MLLM and SAM identity
    seg_token.safetensors   lora.*            LoRA adapter weights of the language model (peft naming)
                            embed_tokens.weight, lm_head.weight   the fully trained, resized embeddings
                            text_hidden_fcs.* the projection
                            mask_decoder.*    the fine-tuned SAM mask decoder

Only what training changed is stored, not the MLLM: loading rebuilds the model on top of the *same* base MLLM
and SAM (checked against the recorded identities; anything else raises :class:`CheckpointMismatchError`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from llavaseg.atomic import atomic_write
from llavaseg.errors import CheckpointMismatchError, UnsupportedError
from llavaseg.models.common import (
    WEIGHT_FILE_ERRORS,
    state_dict_mismatch,
    weights_error,
)
from llavaseg.models.mllm import FrozenMLLM
from llavaseg.models.sam import FrozenSAM
from llavaseg.seg_token.model import (
    FORMAT,
    SegTokenConfig,
    SegTokenModel,
    create_seg_token_model,
    import_peft,
)

CONFIG_NAME = "seg_token.json"
WEIGHTS_NAME = "seg_token.safetensors"

_IDENTITY_KEYS = {"mllm": ("config", "weights"), "sam": ("spec", "weights")}
"""Identity fields that must match (``name`` is a path or id that may legitimately differ between installs)."""


def trained_state(model: SegTokenModel) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores (see module docstring), detached, contiguous, on CPU."""
    state: dict[str, torch.Tensor] = {}
    if model.is_lora:
        get_peft_model_state_dict = import_peft().get_peft_model_state_dict

        for key, value in get_peft_model_state_dict(model.llm).items():
            state[f"lora.{key}"] = value
    state["embed_tokens.weight"] = model.input_embeddings().weight
    state["lm_head.weight"] = model.output_embeddings().weight
    for key, value in model.text_hidden_fcs.state_dict().items():
        state[f"text_hidden_fcs.{key}"] = value
    for key, value in model.mask_decoder.state_dict().items():
        state[f"mask_decoder.{key}"] = value
    return {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}




def save_seg_token_model(model: SegTokenModel, directory: str | Path, *, extra: dict | None = None) -> Path:
    """Write ``model`` into ``directory`` (weights first, config last, each atomically)."""
    if model.config.source != "llavaseg":
        raise UnsupportedError(f"a model loaded from {model.config.source} is a full published checkpoint; "
                               "load it from its own directory instead of re-saving it")
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    state = trained_state(model)
    metadata = {"format": FORMAT}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata=metadata))
    body = model.config.model_dump(mode="json")
    if extra:
        body["extra"] = extra
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(body, indent=2) + "\n",
                                                                       encoding="utf-8"))
    return directory


def read_config(directory: str | Path) -> SegTokenConfig:
    """The checkpoint's :class:`SegTokenConfig`; a missing or malformed file is a :class:`CheckpointMismatchError`."""
    path = Path(directory).expanduser() / CONFIG_NAME
    if not path.is_file():
        raise CheckpointMismatchError(f"{path.parent} is not a [SEG] model directory (no {CONFIG_NAME})")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        body.pop("extra", None)
        config = SegTokenConfig.model_validate(body)
    except (ValueError, ValidationError) as exc:
        raise CheckpointMismatchError(f"{path}: unreadable [SEG] model config ({type(exc).__name__})") from None
    if config.format != FORMAT:
        raise CheckpointMismatchError(f"{path}: format {config.format!r}, expected {FORMAT!r}")
    return config


def check_identity(kind: str, recorded: dict[str, str], actual: dict[str, str], where: Path) -> None:
    """Refuse a checkpoint trained on top of another MLLM / SAM than the one it is loaded into."""
    for key in _IDENTITY_KEYS[kind]:
        if recorded.get(key) != actual.get(key):
            raise CheckpointMismatchError(
                f"{where} was trained for another {kind.upper()} ({key} {recorded.get(key)} vs {actual.get(key)} "
                f"of {actual.get('name', actual.get('spec', '?'))})")


def load_seg_token_model(directory: str | Path, mllm: FrozenMLLM, sam: FrozenSAM) -> SegTokenModel:
    """Rebuild a saved ``[SEG]`` model on deep copies of ``mllm`` and ``sam``'s decoder, refusing mismatches."""
    directory = Path(directory).expanduser()
    config = read_config(directory)
    check_identity("mllm", config.base_mllm, mllm.identity(), directory)
    check_identity("sam", config.sam, sam.identity(), directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointMismatchError(f"{directory}: missing {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights), device=str(mllm.device))
    except WEIGHT_FILE_ERRORS as exc:  # truncated or not a safetensors file
        raise weights_error("[SEG] weights", weights, exc) from None
    model = create_seg_token_model(mllm, sam, lora=config.lora, seed=config.seed, templates=config.templates,
                                   answer_style=config.answer_style)
    if (model.seg_token_id, model.config.vocab_size) != (config.seg_token_id, config.vocab_size):
        raise CheckpointMismatchError(
            f"{directory}: [SEG] id/vocabulary {config.seg_token_id}/{config.vocab_size} do not match the base "
            f"tokenizer's {model.seg_token_id}/{model.config.vocab_size}")
    expected = trained_state(model)
    problem = state_dict_mismatch(expected, state)
    if problem:
        raise CheckpointMismatchError(f"{weights} does not fit this model: {problem}")
    assign_trained_state(model, state)
    model.config = config
    return model.eval()


def assign_trained_state(model: SegTokenModel, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors of :func:`trained_state`'s layout into ``model`` (LoRA, embeddings, projection, decoder)."""
    with torch.no_grad():
        lora = {key[len("lora."):]: value for key, value in state.items() if key.startswith("lora.")}
        if lora:
            set_peft_model_state_dict = import_peft().set_peft_model_state_dict

            result = set_peft_model_state_dict(model.llm, lora)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise CheckpointMismatchError(f"LoRA weights do not fit the model (e.g. {unexpected[0]})")
        model.input_embeddings().weight.copy_(state["embed_tokens.weight"])
        model.output_embeddings().weight.copy_(state["lm_head.weight"])
        model.text_hidden_fcs.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                               if k.startswith("text_hidden_fcs.")})
        model.mask_decoder.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                            if k.startswith("mask_decoder.")})
