"""Tiny, randomly initialised checkpoints of the real transformers image-text-to-text families.

Every builder in :data:`FAMILIES` writes, with ``save_pretrained``, a folder that
``transformers.AutoProcessor.from_pretrained(folder)`` and
``transformers.AutoModelForImageTextToText.from_pretrained(folder)`` load offline. The model is the family's
real ``...ForConditionalGeneration`` class built from a tiny config (hidden sizes 32-64, 1-2 layers, 32-64 px
images); the processor is the family's real processor class (real image processor, real video processor where
the processor owns one) around a word-level ``tokenizers`` tokenizer over a closed vocabulary that holds the
family's special tokens under the same names, plus the family's hub chat template. Everything is seeded, so a
build is deterministic.

Chat templates: each ``*_CHAT_TEMPLATE`` constant below carries, in a comment, where its text was read.
Where the hub file itself could not be read, the comment says so and names the closest documented source:

* ``qwen3-vl``: no copy of ``Qwen/Qwen3-VL-*-Instruct``'s ``chat_template.json`` could be read in full. The
  text is the Qwen3-VL ``render_content`` macro template, with the system/tools header and the ``render_content``
  macro copied from public copies of the Qwen3-VL template, and the message loop / generation prompt of the
  *Instruct* variant (no ``<think>`` handling; generation prompt ``<|im_start|>assistant\\n``). It is
  **reconstructed, not byte-checked**; for the single-turn image+text prompt it renders exactly what the hub
  Instruct template renders (``<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>...<|im_end|>\\n
  <|im_start|>assistant\\n``, no default system turn).
* ``llava-onevision``: the text is ``llava-hf/llava-onevision-qwen2-7b-si-hf``'s ``chat_template.json``
  (824 B) -- the same family of llava-hf conversions; ``llava-onevision-qwen2-0.5b-ov-hf``'s own file (826 B)
  could not be read.
* ``smolvlm``: the text is ``HuggingFaceTB/SmolVLM-500M-Instruct``'s ``chat_template.json`` (429 B);
  ``SmolVLM-256M-Instruct``'s own file could not be read (the SmolVLM/SmolVLM2 releases all ship this text).

* ``llava-next``: the text is the map key for llava-v1.6-mistral in openvino.genai's tokenizer.cpp; its assistant
  turn ends in ``'<\\\\s> '`` (renders ``<\\s>``), whereas one printed copy of the loaded hub processor shows
  ``'</s> '``. Only the assistant branch differs; the generation prompt (``[INST] <image>\\n... [/INST]``) does not.

``SmolVLM-256M-Instruct`` itself is an ``idefics3`` checkpoint, which is what the ``smolvlm`` entry builds
(``Idefics3ForConditionalGeneration`` + ``Idefics3Processor``); ``smolvlm2`` builds SmolVLM2's own classes
(``SmolVLMForConditionalGeneration``, model_type ``smolvlm``), whose processor needs the ``num2words`` package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)
from transformers import PreTrainedTokenizerFast

from llavaseg.models.tiny_llava import words_of  # the word-level split the tiny tokenizers share

__all__ = ["FAMILIES", "FAMILY_CLASSES", "build", "build_tokenizer"]

SEED = 0

# Words every tiny vocabulary holds (the check prompt, a few answers), on top of the words of the chat template.
BASE_WORDS = (
    "what is red ? the a an image picture of in on and this that which color shape object left right top "
    "bottom square circle triangle blue green yellow black white yes no it there where "
    # chat roles, rendered from the messages rather than from the template text
    "user assistant system model USER ASSISTANT SYSTEM User Assistant System"
).split()



# ---------------------------------------------------------------------------------------------------------------
# Chat templates (hub text; the module docstring lists the ones that are not the named repo's own file)
# ---------------------------------------------------------------------------------------------------------------

# llava-hf/llava-1.5-7b-hf, chat_template.json (700 B, "Update chat_template.json to incorporate `generation` tag
# (#29)"). Read from the byte-identical duplicate huggingface.co/FriendliAI/llava-1.5-7b-hf/blob/main/chat_template.json
# ("Duplicate from llava-hf/llava-1.5-7b-hf"); the same text is in huggingface/transformers
# tests/models/llava/test_processing_llava.py (tiny processor "created ... from llava-hf/llava-1.5-7b-hf").
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf, chat_template.json (after "support system msg", Sep 2024). Read from
# openvinotoolkit/openvino.genai src/cpp/src/tokenizer.cpp, chat_template_fallback_map, entry commented
# "tiny-random-llava-next, llava-v1.6-mistral (chat_template.json)" (the map keys must equal the hub text).
LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# llava-hf/llava-onevision-qwen2-7b-si-hf, chat_template.json (824 B, blob 974bbb6c, "Upload processor");
# huggingface.co/llava-hf/llava-onevision-qwen2-7b-si-hf/blob/974bbb6c4e42c98d04bad1798434ed685d0cad4f/chat_template.json.
# The same text is the `chat_template` of huggingface/transformers
# src/transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py (as adapted in public forks).
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen/Qwen2-VL-2B-Instruct, chat_template.json (1.05 kB, "Initial commit"). Read from openvinotoolkit/openvino.genai
# src/cpp/src/tokenizer.cpp, chat_template_fallback_map entry commented "Qwen2-VL-2B-Instruct (tokenizer_config.json)";
# identical to the 1.05 kB chat_template.json of every Qwen2-VL / Qwen2.5-VL mirror read (e.g.
# huggingface.co/optimum-intel-internal-testing/tiny-random-qwen2.5-vl/blob/main/chat_template.json). (The later
# Qwen/Qwen2-VL-7B-Instruct revision db8ce505 only adds {% generation %} tags around assistant text.)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)

# Qwen/Qwen2.5-VL-7B-Instruct, chat_template.json (1.05 kB): the same text as Qwen2-VL's. Read from
# huggingface.co/optimum-intel-internal-testing/tiny-random-qwen2.5-vl/blob/main/chat_template.json (a qwen2_5_vl
# checkpoint) and huggingface.co/MBZUAI/Video-R2 chat_template.json (qwen2_5_vl, 1.05 kB).
QWEN2_5_VL_CHAT_TEMPLATE = QWEN2_VL_CHAT_TEMPLATE

# Qwen/Qwen3-VL-*-Instruct: RECONSTRUCTED, see the module docstring. Header and `render_content` macro as in the
# public copies of the Qwen3-VL template (e.g. huggingface.co/yujiepan/qwen3-vl-tiny-random chat_template.jinja);
# message loop and generation prompt of the Instruct (non-thinking) variant.
QWEN3_VL_CHAT_TEMPLATE = """{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                <|vision_start|><|image_pad|><|vision_end|>
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                <|vision_start|><|video_pad|><|vision_end|>
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- render_content(messages[0].content, false) + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + render_content(messages[0].content, false) + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, True) %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# google/gemma-3-4b-it, chat_template.json. Read from huggingface/transformers
# src/transformers/models/gemma3/convert_gemma3_weights.py, `_CHAT_TEMPLATE` (the template the conversion writes
# into the google/gemma-3-*-it checkpoints); the same text is reproduced in LMFlow's GEMMA3_TEMPLATE docs
# (optimalscale.github.io/LMFlow, lmflow.utils.conversation_template.gemma, which adds {% generation %} tags).
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# OpenGVLab/InternVL3-1B-hf, chat_template. Read from huggingface/transformers
# src/transformers/models/internvl/convert_internvl_weights_to_hf.py, `chat_template` (the template the conversion
# writes into the OpenGVLab/InternVL*-hf checkpoints).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# HuggingFaceTB/SmolVLM-500M-Instruct, chat_template.json (429 B, blob dfffb6e7, "Create chat_template.json"):
# huggingface.co/HuggingFaceTB/SmolVLM-500M-Instruct/blob/dfffb6e7622a286a500146106027bc181c99a80e/chat_template.json
# (SmolVLM-256M-Instruct's own file could not be read; HuggingFaceTB/SmolVLM-Instruct and SmolVLM2-* ship the same text).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def build_tokenizer(
    *,
    special_tokens: Iterable[str],
    words: Iterable[str],
    unk: str,
    pad: str,
    eos: str,
    bos: str | None = None,
    add_bos: bool = False,
    extra_special_tokens: dict[str, str] | None = None,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A left-padding word-level fast tokenizer: ``special_tokens`` (added, never split) + the closed vocabulary
    ``words`` (+ ``BASE_WORDS`` and the words of ``chat_template``). ``add_bos`` prepends ``bos`` like a
    Llama/Mistral sentencepiece tokenizer does."""
    specials = list(
        dict.fromkeys([unk, pad, eos, *([bos] if bos else []), *special_tokens])
    )
    vocab: dict[str, int] = {}
    for token in (*specials, *BASE_WORDS, *words_of([*words, chat_template or ""])):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in specials]
    )
    if add_bos:
        assert bos is not None
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, vocab[bos])],
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        pad_token=pad,
        eos_token=eos,
        bos_token=bos,
        extra_special_tokens=extra_special_tokens or {},
        padding_side="left",
        model_max_length=4096,
    )
    named = set((extra_special_tokens or {}).values()) | {unk, pad, eos, bos}
    others = [t for t in specials if t not in named]
    if others:
        tokenizer.add_special_tokens({"additional_special_tokens": others})
    return tokenizer


def _ids(tokenizer: PreTrainedTokenizerFast, *tokens: str) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    assert tokenizer.unk_token_id not in ids or tokenizer.unk_token in tokens, (
        tokens,
        ids,
    )
    return ids


def _finish(model: torch.nn.Module, processor, tokenizer, folder: Path) -> Path:
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    gen.do_sample = False
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _seed() -> None:
    torch.manual_seed(SEED)


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision
# ---------------------------------------------------------------------------------------------------------------

_VIS = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
)
_TXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def _llava_tokenizer(words: list[str], chat_template: str) -> PreTrainedTokenizerFast:
    """The Llama-style tokenizer LLaVA-1.5 and LLaVA-NeXT share (``<image>``, BOS added), over ``words``."""
    return build_tokenizer(special_tokens=["<image>"], words=words, unk="<unk>", pad="<pad>", eos="</s>",
                           bos="<s>", add_bos=True, extra_special_tokens={"image_token": "<image>"},
                           chat_template=chat_template)


def _llava_clip_processor_and_tower(tok, chat_template: str, processor_class, image_processor):
    """The processor (CLIP patch 8, ``default`` strategy drops CLS) and the CLIP 32 px tower of LLaVA-1.5/NeXT."""
    from transformers import CLIPVisionConfig

    processor = processor_class(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                chat_template=chat_template)
    return processor, CLIPVisionConfig(**_VIS, image_size=32, patch_size=8, projection_dim=32)


def _bos_text(tok) -> dict:
    """Text-config token ids of a tokenizer with BOS (Llama, Mistral)."""
    return dict(**_TXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)


def build_llava_15(folder: Path) -> Path:
    """``LlavaForConditionalGeneration`` (CLIP-ViT 32 px / patch 8 -> 16 image tokens, Llama text) + ``LlavaProcessor``
    with the llava-1.5 settings (``default`` strategy drops CLS, ``num_additional_image_tokens=1``,
    ``vision_feature_layer=-2``)."""
    from transformers import (
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _llava_tokenizer([], LLAVA_15_CHAT_TEMPLATE)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                         do_center_crop=True)
    processor, tower = _llava_clip_processor_and_tower(tok, LLAVA_15_CHAT_TEMPLATE, LlavaProcessor, image_processor)
    config = LlavaConfig(
        vision_config=tower,
        text_config=LlamaConfig(**_bos_text(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    _seed()
    return _finish(LlavaForConditionalGeneration(config), processor, tok, folder)


_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def build_llava_next(folder: Path) -> Path:
    """``LlavaNextForConditionalGeneration`` (CLIP 32 px / patch 8, anyres grid pinpoints up to 64x64, Mistral text)
    + ``LlavaNextProcessor`` with llava-v1.6-mistral settings."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        MistralConfig,
    )

    tok = _llava_tokenizer(["[INST]", "[/INST]", "<<SYS>>"], LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=_PINPOINTS)
    processor, tower = _llava_clip_processor_and_tower(tok, LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE, LlavaNextProcessor,
                                                       image_processor)
    config = LlavaNextConfig(
        vision_config=tower,
        text_config=MistralConfig(**_bos_text(tok), head_dim=16, sliding_window=None),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=16,
    )
    _seed()
    return _finish(LlavaNextForConditionalGeneration(config), processor, tok, folder)


def build_llava_onevision(folder: Path) -> Path:
    """``LlavaOnevisionForConditionalGeneration`` (SigLIP 32 px / patch 8, ``full`` strategy, anyres_max_9 with small
    pinpoints, Qwen2 text) + ``LlavaOnevisionProcessor`` (image + video processor)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = build_tokenizer(
        special_tokens=["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        words=[],
        unk="<unk>",
        pad="<|endoftext|>",
        eos="<|im_end|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
    )
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    video_processor = LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            **_VIS, image_size=32, patch_size=8, vision_use_head=False
        ),
        text_config=Qwen2Config(
            **_TXT,
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=True,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=True,
    )
    _seed()
    return _finish(
        LlavaOnevisionForConditionalGeneration(config), processor, tok, folder
    )


# ---------------------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL / Qwen3-VL
# ---------------------------------------------------------------------------------------------------------------

_QWEN_SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Images are resized to multiples of patch_size * merge_size = 16 px, between 16x16 and 64x64 px.
_QWEN_PIXELS = dict(min_pixels=16 * 16, max_pixels=64 * 64)


def _qwen_tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    return build_tokenizer(
        special_tokens=_QWEN_SPECIALS,
        words=["Picture", "Video", "think"],
        unk="<unk>",
        pad="<|endoftext|>",
        eos="<|im_end|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        chat_template=chat_template,
    )


def _qwen_vision_ids(tok) -> dict:
    image, video, start, end = _ids(
        tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    return dict(
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )


_QWEN_PATCHES = dict(patch_size=8, merge_size=2, temporal_patch_size=2)  # one token per 16x16 px


def _qwen_processor(processor_class, video_processor, chat_template: str):
    """A Qwen-VL processor over the shared tiny tokenizer and ``Qwen2VLImageProcessor`` (all three families use
    it for images); ``video_processor`` is the family's own."""
    from transformers import Qwen2VLImageProcessor

    tok = _qwen_tokenizer(chat_template)
    processor = processor_class(image_processor=Qwen2VLImageProcessor(**_QWEN_PATCHES, **_QWEN_PIXELS),
                                video_processor=video_processor, tokenizer=tok, chat_template=chat_template)
    return processor, tok


def _mrope_text(tok, theta: float, **extra) -> dict:
    """Text config with M-RoPE over (temporal, height, width) sections of 2, 3 and 3 rotary pairs."""
    rope = {"rope_type": "default", "rope_theta": theta, "mrope_section": [2, 3, 3], **extra.pop("rope", {})}
    return _qwen_text(tok, rope_parameters=rope, **extra)


def _qwen_text(tok, **extra) -> dict:
    return dict(
        **_TXT,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        **extra,
    )


def build_qwen2_vl(folder: Path) -> Path:
    """``Qwen2VLForConditionalGeneration`` (ViT patch 8, merge 2 -> one token per 16x16 px, M-RoPE) +
    ``Qwen2VLProcessor`` (``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor``, 16..64x64 px)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    processor, tok = _qwen_processor(Qwen2VLProcessor, Qwen2VLVideoProcessor(**_QWEN_PATCHES, **_QWEN_PIXELS),
                                     QWEN2_VL_CHAT_TEMPLATE)
    config = Qwen2VLConfig(
        text_config=_mrope_text(tok, 1e6),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=_TXT["hidden_size"],
            num_heads=2,
            mlp_ratio=2,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **_qwen_vision_ids(tok),
    )
    _seed()
    return _finish(Qwen2VLForConditionalGeneration(config), processor, tok, folder)


def build_qwen2_5_vl(folder: Path) -> Path:
    """``Qwen2_5_VLForConditionalGeneration`` (windowed ViT patch 8, merge 2, M-RoPE) + ``Qwen2_5_VLProcessor``."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLVideoProcessor,
    )

    processor, tok = _qwen_processor(Qwen2_5_VLProcessor, Qwen2VLVideoProcessor(**_QWEN_PATCHES, **_QWEN_PIXELS),
                                     QWEN2_5_VL_CHAT_TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config=_mrope_text(tok, 1e6),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=_TXT["hidden_size"],
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=32,
            fullatt_block_indexes=[1],
        ),
        **_qwen_vision_ids(tok),
    )
    _seed()
    return _finish(Qwen2_5_VLForConditionalGeneration(config), processor, tok, folder)


def build_qwen3_vl(folder: Path) -> Path:
    """``Qwen3VLForConditionalGeneration`` (ViT patch 8, merge 2, deepstack layer 0, interleaved M-RoPE) +
    ``Qwen3VLProcessor`` (``Qwen2VLImageProcessor`` / ``Qwen3VLVideoProcessor``)."""
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    video = Qwen3VLVideoProcessor(**_QWEN_PATCHES, size={"shortest_edge": 16 * 16 * 2, "longest_edge": 64 * 64 * 2})
    processor, tok = _qwen_processor(Qwen3VLProcessor, video, QWEN3_VL_CHAT_TEMPLATE)
    config = Qwen3VLConfig(
        text_config=_mrope_text(tok, 5e6, head_dim=16, rope={"mrope_interleaved": True}),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=_TXT["hidden_size"],
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        **_qwen_vision_ids(tok),
    )
    _seed()
    return _finish(Qwen3VLForConditionalGeneration(config), processor, tok, folder)


# ---------------------------------------------------------------------------------------------------------------
# Gemma 3
# ---------------------------------------------------------------------------------------------------------------


def build_gemma3(folder: Path) -> Path:
    """``Gemma3ForConditionalGeneration`` (SigLIP 32 px / patch 8, pooled to 4 soft tokens, sliding+global text
    layers) + ``Gemma3Processor`` (``Gemma3ImageProcessor``; returns ``token_type_ids``)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tok = build_tokenizer(
        special_tokens=[
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ],
        words=["model", "user"],
        unk="<unk>",
        pad="<pad>",
        eos="<eos>",
        bos="<bos>",
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    image_processor = Gemma3ImageProcessor(
        size={"height": 32, "width": 32}, do_pan_and_scan=False
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_length=4,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    boi, eoi, image = _ids(
        tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>"
    )
    config = Gemma3Config(
        text_config=Gemma3TextConfig(
            **{**_TXT, "num_hidden_layers": 2},
            head_dim=16,
            vocab_size=len(tok),
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        vision_config=SiglipVisionConfig(
            **_VIS, image_size=32, patch_size=8, vision_use_head=False
        ),
        mm_tokens_per_image=4,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=image,
    )
    _seed()
    return _finish(Gemma3ForConditionalGeneration(config), processor, tok, folder)


# ---------------------------------------------------------------------------------------------------------------
# InternVL
# ---------------------------------------------------------------------------------------------------------------


def build_internvl(folder: Path) -> Path:
    """``InternVLForConditionalGeneration`` (InternViT 32 px / patch 8, pixel-shuffle 0.5 -> 4 tokens per tile,
    Qwen2 text) + ``InternVLProcessor`` (``GotOcr2ImageProcessor`` with crop-to-patches up to 4 tiles + thumbnail,
    ``InternVLVideoProcessor``)."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    tok = build_tokenizer(
        special_tokens=[
            "<|im_start|>",
            "<|im_end|>",
            "<img>",
            "</img>",
            "<IMG_CONTEXT>",
            "<video>",
        ],
        words=[],
        unk="<unk>",
        pad="<|endoftext|>",
        eos="<|im_end|>",
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    image_processor = GotOcr2ImageProcessor(
        size={"height": 32, "width": 32},
        crop_to_patches=True,
        min_patches=1,
        max_patches=4,
    )
    video_processor = InternVLVideoProcessor(size={"height": 32, "width": 32})
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        image_seq_length=4,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            **_VIS, image_size=[32, 32], patch_size=[8, 8]
        ),
        text_config=Qwen2Config(
            **_TXT,
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=True,
        ),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    _seed()
    return _finish(InternVLForConditionalGeneration(config), processor, tok, folder)


# ---------------------------------------------------------------------------------------------------------------
# Idefics3 / SmolVLM
# ---------------------------------------------------------------------------------------------------------------


def _idefics_style(folder: Path, smolvlm2: bool) -> Path:
    """One builder for the two SmolVLM generations, which differ only in class names (and SmolVLM2's video
    processor): SigLIP-like 32 px / patch 8 vision, pixel-shuffle 2 -> 4 tokens per tile, Llama text; the image
    processor splits an image into up to 2x2 tiles of 32 px plus a global image."""
    import transformers
    from transformers import LlamaConfig

    prefix = "SmolVLM" if smolvlm2 else "Idefics3"
    classes = {name: getattr(transformers, f"{prefix}{name}") for name in (
        "Config", "ForConditionalGeneration", "ImageProcessor", "Processor", "VisionConfig")}
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
    tok = build_tokenizer(
        special_tokens=[
            "<|im_start|>",
            "<end_of_utterance>",
            "<fake_token_around_image>",
            "<image>",
            "<global-img>",
            *grid,
        ],
        words=["User", "Assistant"],
        unk="<|endoftext|>",
        pad="<|im_end|>",
        eos="<end_of_utterance>",
        bos="<|im_start|>",
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    image_processor = classes["ImageProcessor"](
        size={"longest_edge": 64},
        max_image_size={"longest_edge": 32},
        do_image_splitting=True,
    )
    video = {"video_processor": transformers.SmolVLMVideoProcessor()} if smolvlm2 else {}
    processor = classes["Processor"](
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=4,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
        **video,
    )
    config = classes["Config"](
        vision_config=classes["VisionConfig"](**_VIS, image_size=32, patch_size=8),
        text_config=LlamaConfig(
            **_TXT,
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
    )
    _seed()
    return _finish(classes["ForConditionalGeneration"](config), processor, tok, folder)


def build_smolvlm(folder: Path) -> Path:
    """SmolVLM-256M-Instruct's classes: ``Idefics3ForConditionalGeneration`` + ``Idefics3Processor``."""
    return _idefics_style(folder, smolvlm2=False)


def build_smolvlm2(folder: Path) -> Path:
    """SmolVLM2's classes (model_type ``smolvlm``): ``SmolVLMForConditionalGeneration`` + ``SmolVLMProcessor``,
    whose processor imports ``num2words`` (a ``dev`` dependency for this test)."""
    return _idefics_style(folder, smolvlm2=True)


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------

FAMILIES: dict[str, Callable[[Path], Path]] = {
    "llava-1.5": build_llava_15,
    "llava-next": build_llava_next,
    "llava-onevision": build_llava_onevision,
    "qwen2-vl": build_qwen2_vl,
    "qwen2.5-vl": build_qwen2_5_vl,
    "qwen3-vl": build_qwen3_vl,
    "gemma3": build_gemma3,
    "internvl": build_internvl,
    "smolvlm": build_smolvlm,
    "smolvlm2": build_smolvlm2,
}

# (model class, processor class) each family's folder loads as through the Auto classes.
FAMILY_CLASSES: dict[str, tuple[str, str]] = {
    "llava-1.5": ("LlavaForConditionalGeneration", "LlavaProcessor"),
    "llava-next": ("LlavaNextForConditionalGeneration", "LlavaNextProcessor"),
    "llava-onevision": (
        "LlavaOnevisionForConditionalGeneration",
        "LlavaOnevisionProcessor",
    ),
    "qwen2-vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2.5-vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3-vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    "gemma3": ("Gemma3ForConditionalGeneration", "Gemma3Processor"),
    "internvl": ("InternVLForConditionalGeneration", "InternVLProcessor"),
    "smolvlm": ("Idefics3ForConditionalGeneration", "Idefics3Processor"),
    "smolvlm2": ("SmolVLMForConditionalGeneration", "SmolVLMProcessor"),
}


def build(family: str, folder: Path) -> Path:
    """Build ``family``'s tiny checkpoint into ``folder`` (created if missing) and return the folder."""
    return FAMILIES[family](Path(folder))
