"""The LISA-style ``[SEG]`` model: a fine-tuned copy of the MLLM whose ``[SEG]`` hidden state prompts SAM.

Mechanics follow LISA's ``model/LISA.py`` (``docs/lisa.md`` §2, §8), re-implemented on transformers' LLaVA classes:

* ``[SEG]`` is added to a *copy* of the tokenizer as one new token and the copy's embeddings are resized
  (new rows drawn like transformers 4.31 did for LISA, ``mean_resizing=False``). The token is checked to encode
  as exactly one id (LISA issue #55: some Llama tokenizers emit ``[29871, 32000]`` for ``"[SEG]"``).
* The hidden state used for a ``[SEG]`` is the **last layer's** output at the position that *predicts* it (the
  token before it): ``mask[t] = input_ids[t + 1] == seg_id``. LISA needs an extra 255-position pad because its
  LLaVA v1 code splices 256 image features in place of ONE ``<image>`` id inside the model. transformers'
  ``LlavaForConditionalGeneration`` does not: its processor expands ``<image>`` into ``image_seq_length``
  placeholder ids in ``input_ids`` itself and the model ``masked_scatter``s the projected image features into
  exactly those embedding rows, so the hidden-state sequence aligns 1:1 with ``input_ids`` (verified in
  transformers 5.23, ``LlavaModel.get_placeholder_mask``; tested in ``tests/test_seg_token.py``). No pad.
* ``text_hidden_fcs``: ``Linear(hidden, hidden) -> ReLU -> Linear(hidden, prompt_dim) -> Dropout(0)`` turns the
  hidden state into ONE sparse prompt token. With the no-mask dense embedding (``FrozenSAM.no_mask_dense``) and
  ``multimask_output=False`` the decoder's mask token 0 is upscaled to the original size; pixels with logit > 0
  are the mask.

What trains (LISA ``train_ds.py``): LoRA (r=8, alpha=16, dropout 0.05) on ``q_proj``/``v_proj`` of the language
model only, the full ``embed_tokens`` and ``lm_head``, SAM's mask decoder and the projection. Frozen: vision
tower, projector, SAM image encoder and prompt encoder. The shared :class:`FrozenMLLM` and :class:`FrozenSAM` are
never modified: this model owns deep copies of the LLaVA module, the processor (tokenizer) and the mask decoder,
and only *reads* the shared SAM (image-embedding cache, prompt encoder's positional encoding and no-mask
embedding, ``postprocess_masks``).
"""

from __future__ import annotations

import copy
import random
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from llavaseg.errors import UnsupportedError
from llavaseg.models.mllm import FrozenMLLM
from llavaseg.models.sam import FrozenSAM, SamImageFeatures
from llavaseg.seg_token.prompts import SEG_TOKEN, AnswerStyle, TemplateSet, template_set

FORMAT = "llavaseg-seg-token-v1"

LLM_QV_REGEX = r".*\.language_model\..*\.(q_proj|v_proj)"
"""peft ``target_modules`` (full match): q/v projections of the language model only. A plain ``["q_proj",
"v_proj"]`` would also hit the CLIP vision tower, whose attention uses the same names."""


class LoraSettings(BaseModel):
    """LISA's LoRA hyper-parameters (``train_ds.py`` defaults)."""

    model_config = ConfigDict(frozen=True)

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str = LLM_QV_REGEX


class SegTokenConfig(BaseModel):
    """Everything needed to rebuild a saved ``[SEG]`` model on top of its base MLLM and SAM (saved as JSON)."""

    format: str = FORMAT
    seg_token: str = SEG_TOKEN
    seg_token_id: int
    base_vocab_size: int
    vocab_size: int
    hidden_size: int
    prompt_dim: int
    lora: LoraSettings | None = LoraSettings()
    base_mllm: dict[str, str]
    sam: dict[str, str]
    source: str = "llavaseg"
    seed: int = 0
    trained_steps: int = 0
    templates: str = "lisa"  # the TemplateSet trained with (and used at inference)
    answer_style: AnswerStyle = "lisa"  # "attributes-first": seg-token-cot, an extension of LISA


def import_peft() -> Any:
    """``import peft``, without the warning bitsandbytes logs when peft imports it on a CPU machine (about an
    optional accelerated 4-bit kernel package; the ``[SEG]`` route uses neither 4-bit weights nor that kernel)."""
    import logging

    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import peft
    finally:
        quiet.setLevel(level)
    return peft


# ------------------------------------------------------------------------------------------ token handling
def add_seg_token(tokenizer: Any, token: str = SEG_TOKEN) -> int:
    """Add ``token`` as one new (non-special) token if absent and return its id, refusing a split encoding.

    Non-special like LISA's ``tokenizer.add_tokens("[SEG]")``: decoding with ``skip_special_tokens`` keeps it,
    so generated text shows where masks were emitted.
    """
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token])
    token_id = tokenizer.convert_tokens_to_ids(token)
    encoded = tokenizer(f"x {token}.", add_special_tokens=False)["input_ids"]
    alone = tokenizer(token, add_special_tokens=False)["input_ids"]
    if token_id is None or token_id == tokenizer.unk_token_id or encoded.count(token_id) != 1 or token_id not in alone:
        raise UnsupportedError(f"the tokenizer does not encode {token!r} as one token (got {alone}); "
                               "see LISA issue #55")
    return int(token_id)


def seg_token_mask(input_ids: torch.Tensor, seg_id: int, start: int = 0) -> torch.Tensor:
    """``B x T`` bool: True at position ``t`` when ``input_ids[:, t + 1]`` is ``[SEG]`` (the predicting position).

    ``start`` ignores ``[SEG]`` ids before that index (e.g. a ``[SEG]`` typed into the prompt when only generated
    ones should count). The last position is always False (it predicts nothing in the sequence).
    """
    nxt = input_ids[:, 1:] == seg_id
    if start > 1:
        nxt[:, : start - 1] = False
    return torch.cat([nxt, torch.zeros_like(nxt[:, :1])], dim=1)


def select_seg_hidden(hidden: torch.Tensor, input_ids: torch.Tensor, seg_id: int, start: int = 0
                      ) -> list[torch.Tensor]:
    """Per batch row, the ``n_i x H`` hidden states that predict each ``[SEG]`` of ``input_ids``, in order."""
    if hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape[:2])} do not align with input ids {tuple(input_ids.shape)}")
    mask = seg_token_mask(input_ids, seg_id, start)
    return [hidden[row][mask[row]] for row in range(input_ids.shape[0])]


def text_hidden_fcs(hidden: int, prompt_dim: int) -> nn.Sequential:
    """LISA's projection gamma: ``Linear(h, h) -> ReLU -> Linear(h, prompt_dim) -> Dropout(0.0)``."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, prompt_dim),
                         nn.Dropout(0.0))


# -------------------------------------------------------------------------------------------------- model
class SegTokenModel(nn.Module):
    """Fine-tunable LLaVA copy (optionally LoRA-wrapped) + projection + SAM mask-decoder copy.

    ``llm`` is either a peft model wrapping a ``LlavaForConditionalGeneration`` or the bare model (checkpoints
    whose LoRA is already merged, e.g. LISA's). ``sam`` is the shared frozen SAM, held by reference and not
    registered as a sub-module (so it is neither saved nor moved nor trained with this model).
    """

    def __init__(self, llm: nn.Module, processor: Any, mlp: nn.Module, mask_decoder: nn.Module, sam: FrozenSAM,
                 config: SegTokenConfig) -> None:
        super().__init__()
        self.llm = llm
        self.text_hidden_fcs = mlp
        self.mask_decoder = mask_decoder
        self.processor = processor
        self.config = config
        self.sam = sam
        self._dialogue: FrozenMLLM | None = None
        self.version = 0  # bumped by every optimiser step: cached merged copies are then stale

    # ------------------------------------------------------------------------------------------- facts
    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def seg_token_id(self) -> int:
        return self.config.seg_token_id

    @property
    def device(self) -> torch.device:
        return next(self.text_hidden_fcs.parameters()).device

    @property
    def is_lora(self) -> bool:
        return hasattr(self.llm, "peft_config")

    @property
    def llava(self) -> nn.Module:
        """The ``LlavaForConditionalGeneration`` (with LoRA layers injected, if any): call it or ``generate``."""
        return self.llm.get_base_model() if self.is_lora else self.llm

    def input_embeddings(self) -> nn.Embedding:
        return self.llava.get_input_embeddings()

    def output_embeddings(self) -> nn.Module:
        return self.llava.get_output_embeddings()

    # ----------------------------------------------------------------------------------------- trainability
    def set_trainable(self) -> None:
        """Apply LISA's trainable set (see module docstring); everything else is frozen."""
        for parameter in self.llm.parameters():
            parameter.requires_grad_(False)
        for name, parameter in self.llm.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(True)
        self.input_embeddings().weight.requires_grad_(True)
        self.output_embeddings().weight.requires_grad_(True)
        for parameter in self.text_hidden_fcs.parameters():
            parameter.requires_grad_(True)
        for parameter in self.mask_decoder.parameters():
            parameter.requires_grad_(True)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by path: ``language`` (LoRA, embeddings, LM head) and ``mask`` (projection and
        mask decoder), for clipping each group's gradient on its own."""
        groups: dict[str, list[nn.Parameter]] = {"language": [], "mask": []}
        for name, parameter in self.trainable_parameters().items():
            on_mask_path = name.startswith(("text_hidden_fcs", "mask_decoder"))
            groups["mask" if on_mask_path else "language"].append(parameter)
        return groups

    @property
    def templates(self) -> TemplateSet:
        return template_set(self.config.templates)

    # --------------------------------------------------------------------------------------------- mask path
    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """``n x H`` hidden states -> ``n x prompt_dim`` sparse prompt tokens."""
        return self.text_hidden_fcs(hidden.to(self.text_hidden_fcs[0].weight.dtype))

    def decode(self, features: SamImageFeatures, prompts: torch.Tensor, size: tuple[int, int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits ``n x H x W`` (original size, or ``size``) and predicted IoU ``n`` for ``n`` prompts on ONE
        image: each prompt is one sparse token, dense = SAM's no-mask embedding, ``multimask_output=False``."""
        height, width = size or features.original_size
        n = prompts.shape[0]
        if n == 0:
            return prompts.new_zeros((0, height, width)), prompts.new_zeros((0,))
        low, iou = self.sam.decode(features, prompts[:, None, :], multimask_output=False, decoder=self.mask_decoder)
        logits = self.sam.upscale(low, features, (height, width))
        return logits[:, 0], iou[:, 0]

    # -------------------------------------------------------------------------------------------- dialogue
    def merged_llava(self) -> nn.Module:
        """A standalone copy of the fine-tuned LLaVA with LoRA merged into its weights (for plain chat)."""
        if not self.is_lora:
            return copy.deepcopy(self.llm)
        return copy.deepcopy(self.llm).merge_and_unload()

    def dialogue_model(self) -> FrozenMLLM:
        """The fine-tuned LLM as a :class:`FrozenMLLM` (merged copy, same processor incl. ``[SEG]``), cached until
        the next optimiser step."""
        if self._dialogue is None or getattr(self._dialogue, "_seg_token_version", -1) != self.version:
            name = f"seg-token[{self.config.base_mllm.get('name', '?')}]@{self.config.trained_steps}"
            dialogue = FrozenMLLM(self.merged_llava(), self.processor, name=name)
            dialogue._seg_token_version = self.version  # type: ignore[attr-defined]
            self._dialogue = dialogue
        return self._dialogue

    def bump_version(self) -> None:
        self.version += 1
        self._dialogue = None


def _check_lora_targets(llm: nn.Module) -> None:
    """Refuse a LoRA injection that touched anything but the language model's q/v projections."""
    wrapped = [name for name, module in llm.named_modules() if hasattr(module, "lora_A")]
    bad = [name for name in wrapped if ".language_model." not in name or name.rsplit(".", 1)[-1] not in
           ("q_proj", "v_proj")]
    if not wrapped or bad:
        raise UnsupportedError(f"LoRA must wrap the language model's q_proj/v_proj only; wrapped {bad or 'nothing'}")


def create_seg_token_model(mllm: FrozenMLLM, sam: FrozenSAM, *, lora: LoraSettings | None = LoraSettings(),
                           seed: int = 0, templates: str = "lisa", answer_style: AnswerStyle = "lisa") -> SegTokenModel:
    """An untrained ``[SEG]`` model on deep copies of ``mllm`` (LoRA at init, random projection)."""
    base_identity = mllm.identity()
    processor = copy.deepcopy(mllm.processor)
    tokenizer = processor.tokenizer
    base_vocab = len(tokenizer)
    seg_id = add_seg_token(tokenizer)
    random.seed(seed)
    torch.manual_seed(seed)
    llava = copy.deepcopy(mllm.model)
    llava.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    llm: nn.Module = llava
    if lora is not None:
        import warnings

        peft = import_peft()
        LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

        with warnings.catch_warnings():  # peft probes a transformers attribute deprecated in v5 (FutureWarning)
            warnings.simplefilter("ignore", FutureWarning)
            llm = get_peft_model(llava, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                   target_modules=lora.target_modules, bias="none"))
        _check_lora_targets(llm)
    hidden = llava.config.get_text_config().hidden_size
    mlp = text_hidden_fcs(hidden, sam.prompt_dim).to(mllm.device)
    decoder = copy.deepcopy(sam.mask_decoder)
    config = SegTokenConfig(seg_token_id=seg_id, base_vocab_size=base_vocab, vocab_size=len(tokenizer),
                            hidden_size=hidden, prompt_dim=sam.prompt_dim, lora=lora, base_mllm=base_identity,
                            sam=sam.identity(), seed=seed, templates=template_set(templates).name,
                            answer_style=answer_style)
    model = SegTokenModel(llm, processor, mlp, decoder, sam, config)
    model.set_trainable()
    return model.eval()
