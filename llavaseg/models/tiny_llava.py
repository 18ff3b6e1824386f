"""Small LLaVA-architecture models built from configs, with an offline word-level tokenizer.

No LLaVA weights or tokenizer files can be downloaded here, yet the library must exercise the *real*
transformers path (``LlavaForConditionalGeneration`` + ``LlavaProcessor`` + chat template). This module builds
exactly those classes from small configs and a word-level tokenizer made from a closed vocabulary, so the
result can be ``save_pretrained``-ed to a directory and loaded back with the same ``from_pretrained`` call a
user makes for ``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from pydantic import BaseModel, ConfigDict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from llavaseg.models.chat_templates import llava_chat_template

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
IMAGE_TOKEN = "<image>"

# The llava-1.5 conversation format ("USER: <image>\n... ASSISTANT: ...</s>"), written as a chat template so
# the tiny models go through ``processor.apply_chat_template`` exactly like llava-hf checkpoints do.
LLAVA_15_CHAT_TEMPLATE = llava_chat_template()

CHAT_TEMPLATE_WORDS = ("USER", "ASSISTANT", ":")

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def words_of(texts: Iterable[str]) -> list[str]:
    """Split texts the way the word-level tokenizer does (words and single punctuation marks)."""
    found: dict[str, None] = {}
    for text in texts:
        for token in _WORD_RE.findall(text):
            found.setdefault(token, None)
    return list(found)


class TinyLlavaSpec(BaseModel):
    """Architecture of a small LLaVA; every field maps onto a transformers config field."""

    model_config = ConfigDict(frozen=True)

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 128  # multiples of 64: bitsandbytes CPU 4-bit kernels need them
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    max_positions: int = 512

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over a closed vocabulary (plus the chat-template words), left-padding."""
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *CHAT_TEMPLATE_WORDS, *words_of(words)):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def build_tiny_processor(words: Iterable[str], spec: TinyLlavaSpec) -> LlavaProcessor:
    """A ``LlavaProcessor`` (CLIP image processor + word tokenizer + llava-1.5 chat template)."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_word_tokenizer(words),
        patch_size=spec.patch_size,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_15_CHAT_TEMPLATE,
        num_additional_image_tokens=0,
    )


def build_tiny_llava(
    words: Iterable[str], spec: TinyLlavaSpec | None = None, seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a randomly initialised small ``LlavaForConditionalGeneration`` and its processor.

    The model drops the vision CLS token (``vision_feature_select_strategy="default"``), so it consumes
    ``(image_size / patch_size) ** 2`` image features; the processor expands ``<image>`` into exactly that many
    placeholder tokens (its "full" strategy with no additional tokens counts the patches only).
    """
    spec = spec or TinyLlavaSpec()
    processor = build_tiny_processor(words, spec)
    tokenizer = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            projection_dim=spec.vision_hidden,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_heads,
            max_position_embeddings=spec.max_positions,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=spec.num_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval(), processor


def tiny_vocabulary() -> list[str]:
    """Words of the tiny world and of the shipped prompt templates (the random tiny MLLM's vocabulary)."""
    from llavaseg.prompting import PromptSet
    from llavaseg.tinyworld.vocab import VOCAB

    prompts = PromptSet.load()
    return [*VOCAB, *" ".join(t.text for t in prompts.templates.values()).replace("{", " ").replace("}", " ").split()]
