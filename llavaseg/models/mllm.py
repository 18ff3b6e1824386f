"""A frozen multimodal LLM behind one small interface: multi-turn chat about an image.

Wraps any transformers image-text-to-text model that has a processor with a chat template (LLaVA-1.5,
LLaVA-NeXT, and the small ``tiny``/``tiny-world`` models built from the same classes). The wrapper freezes every
parameter and keeps the model in ``eval()`` mode: the LLaVASeg route never changes the MLLM, so its ordinary
chat answers stay exactly those of the base model.

Conversations are continued at the token level: turn *k+1* is the token ids of turn *k* (prompt and generated
answer) followed by the template's text between an answer and the next user turn. That makes the second
chain-of-thought stage an exact continuation of the first, so it can reuse the first stage's key/value cache
instead of re-encoding the image and prompt (``reuse_cache``), with identical results.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError

from llavaseg.errors import CheckpointMismatchError, InputError, UnsupportedError
from llavaseg.models.common import freeze, resolve_dtype, weights_error

Quantization = Literal["4bit", "8bit"] | None

_SENTINEL = "\u2063LLAVASEG_ANSWER\u2063"


def _bitsandbytes_config(quantization: Quantization, compute_dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ModuleNotFoundError:
        raise UnsupportedError(f"{quantization} loading needs bitsandbytes: pip install 'llavaseg[quant]'") from None
    except Exception as exc:  # a broken native library
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedError(f"{quantization} loading needs bitsandbytes, which failed to import ({first})") from None
    # Note: bitsandbytes' CPU 4-bit kernels need every quantised layer's input width to be a multiple of its
    # block size (64); published LLaVA widths are, and the tiny models are built to be.
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


@lru_cache(maxsize=1)
def _cache_kwarg() -> str:
    """The name ``generate`` takes a KV cache by: ``cache`` where transformers renamed ``past_key_values``
    (the old name then warns on every call), ``past_key_values`` before."""
    from transformers.generation.utils import GenerationMixin

    try:
        source = inspect.getsource(GenerationMixin.generate)
    except (OSError, TypeError):  # pragma: no cover - no sources installed
        return "past_key_values"
    return "cache" if re.search(r"deprecate_kwarg\(\s*[\"']past_key_values[\"'][^)]*new_name=[\"']cache", source) \
        else "past_key_values"


class Turn(BaseModel):
    """One exchange of a conversation: the user's text and the model's answer."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    answer: str


@dataclass
class Conversation:
    """State of a batch of conversations between turns: token ids so far, image inputs, optional KV cache."""

    first_prompts: list[str]
    rows: list[list[int]]
    pixel_values: torch.Tensor
    extra: dict[str, torch.Tensor]  # per-image processor outputs (image_grid_thw, image_sizes, ...)
    reuse_cache: bool
    cache: Any = None
    image_features: list[torch.Tensor] | None = None  # per-image encoder outputs, replacing pixel_values
    # Per-token processor outputs (Qwen-VL's mm_token_type_ids, Gemma 3's token_type_ids), one unpadded list per
    # row, kept the same length as ``rows``: every token added after the first prompt is text (0).
    token_rows: dict[str, list[list[int]]] = field(default_factory=dict)

    def extend(self, index: int, ids: list[int]) -> None:
        """Append ``ids`` (text) to conversation ``index`` and to its per-token processor outputs."""
        self.rows[index] = self.rows[index] + ids
        for values in self.token_rows.values():
            values[index] = values[index] + [0] * len(ids)


@dataclass(frozen=True)
class Decoding:
    """How one turn is decoded: greedy by default; ``sample`` draws with ``temperature``, each conversation from
    its own generator seeded by ``seed`` and its token ids (:mod:`llavaseg.models.sampling`: the same draw in any
    batch; the global RNG is left as it was); ``constraint`` builds transformers' ``prefix_allowed_tokens_fn`` from
    the width of the prompt the answer starts after (constrained decoding, :mod:`llavaseg.method.constrained`)."""

    sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    constraint: Any = None
    beams: int = 1  # > 1: beam search returning every beam (FrozenMLLM.follow_up_beams)


def control_tokens(processor: Any) -> list[str]:
    """Strings the processor's tokenizer turns into control tokens (``<image>``, ``</s>``, ``<|im_start|>``,
    ``[SEG]``...), longest first. In a query they would add image slots or end turns: the processor then fails
    deep inside, or the model answers a conversation the user did not write."""
    tokenizer = processor.tokenizer
    tokens = set(tokenizer.all_special_tokens)
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added.content))
    for attribute in ("image_token", "video_token", "boi_token", "eoi_token"):
        value = getattr(processor, attribute, None)
        if isinstance(value, str):
            tokens.add(value)
    return sorted((t for t in tokens if len(t.strip()) > 1), key=len, reverse=True)


def check_no_control_tokens(prompt: str, tokens: list[str]) -> None:
    for token in tokens:
        if token in prompt:
            raise InputError(f"the query or template holds {token!r}, a control token of the MLLM's tokenizer; "
                             "remove it (it would change the conversation the model sees)")


class FrozenMLLM:
    """A frozen image-text-to-text model plus its processor; answers multi-turn questions about one image."""

    def __init__(self, model: torch.nn.Module, processor: Any, *, name: str = "custom",
                 max_new_tokens: int = 48, image_cache_size: int = 32) -> None:
        self.model = freeze(model)
        # Vision-tower outputs per image (keyed by pixel content): every query on an image after the first
        # skips the vision tower. None = not yet known whether this model accepts precomputed features.
        self._image_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.image_cache_size = image_cache_size
        self._features_supported: bool | None = None
        self._features_stacked = False
        self.row_calls = 0  # conversations x turns sent to the model so far (cost accounting)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        self.max_new_tokens = max_new_tokens
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"  # decoder-only batching: pad on the left, generate on the right
        self._control_tokens = control_tokens(processor)

    def check_prompt(self, prompt: str) -> None:
        """Refuse a user turn holding one of the tokenizer's control tokens (see :func:`control_tokens`)."""
        check_no_control_tokens(prompt, self._control_tokens)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device: str = "cpu", dtype: str | torch.dtype | None = "auto",
                        quantization: Quantization = None, max_new_tokens: int = 48,
                        local_files_only: bool = False) -> FrozenMLLM:
        """Load an HF id (``llava-hf/llava-1.5-7b-hf``) or a local ``save_pretrained`` directory, frozen.

        ``quantization="4bit"|"8bit"`` loads through bitsandbytes (works on CPU and CUDA with recent
        bitsandbytes; a clear :class:`UnsupportedError` otherwise).
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch_dtype = resolve_dtype(dtype, device)
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": local_files_only}
        if quantization is not None:
            if quantization not in ("4bit", "8bit"):
                raise ValueError(f"quantization must be '4bit', '8bit' or None, got {quantization!r}")
            kwargs["quantization_config"] = _bitsandbytes_config(quantization, torch_dtype)
            kwargs["device_map"] = {"": device}
        path = Path(name_or_path)
        if path.exists() and not (path / "config.json").is_file():
            raise CheckpointMismatchError(f"{path} is not a transformers model directory (no config.json)")
        try:
            processor = AutoProcessor.from_pretrained(str(name_or_path), local_files_only=local_files_only)
            model = AutoModelForImageTextToText.from_pretrained(str(name_or_path), **kwargs)
        except (pickle.UnpicklingError, SafetensorError, EOFError) as exc:  # damaged or refused weights file
            raise weights_error("MLLM weights in", name_or_path, exc) from None
        except (OSError, ValueError, ImportError) as exc:  # ImportError: a processor needing a package (num2words)
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedError(f"cannot load MLLM {name_or_path!s}: {first_line}") from None
        if quantization is None:
            model = model.to(device)
        if getattr(processor, "chat_template", None) is None:
            raise UnsupportedError(f"MLLM {name_or_path!s} has no chat template; it cannot be prompted in turns")
        return cls(model, processor, name=str(name_or_path), max_new_tokens=max_new_tokens)

    # ---------------------------------------------------------------------------------------------- identity
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def identity(self) -> dict[str, str]:
        """What determines this model's outputs: used in cache keys and recorded with trained adapters.

        Computed once (the model is frozen) from the config and the first values of a few tensors."""
        if getattr(self, "_identity", None) is None:
            self._identity = self._compute_identity()
        return dict(self._identity)

    def _compute_identity(self) -> dict[str, str]:
        config = self.model.config.to_dict()
        for where in (config, *(v for v in config.values() if isinstance(v, dict))):
            where.pop("_name_or_path", None)  # the load path, not a property of the model
        blob = json.dumps(config, sort_keys=True, default=str).encode()
        weights = hashlib.blake2b(digest_size=8)
        for _, tensor in sorted(self.model.state_dict().items())[:4]:
            weights.update(tensor.detach().flatten()[:1024].float().cpu().numpy().tobytes())  # first 4096 bytes
        # A local directory is named by its last component: moving a checkout must not invalidate caches.
        name = Path(self.name).name if Path(self.name).is_dir() else self.name
        return {"name": name, "config": hashlib.blake2b(blob, digest_size=8).hexdigest(),
                "weights": weights.hexdigest()}

    # --------------------------------------------------------------------------------------------- prompting
    def render_chat(self, turns: list[Turn], next_prompt: str | None) -> str:
        """The chat-template text of ``turns`` followed by ``next_prompt`` awaiting an answer."""
        messages: list[dict[str, Any]] = []
        for index, turn in enumerate([*turns, Turn(prompt=next_prompt, answer="")] if next_prompt is not None
                                     else turns):
            content: list[dict[str, str]] = [{"type": "text", "text": turn.prompt}]
            if index == 0:
                content.insert(0, {"type": "image"})
            messages.append({"role": "user", "content": content})
            if index < len(turns):
                messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=next_prompt is not None,
                                                  tokenize=False)

    def _continuation_text(self, first_prompt: str, next_prompt: str) -> str:
        """Template text between an assistant answer and the generation prompt of the next user turn."""
        text = self.render_chat([Turn(prompt=first_prompt, answer=_SENTINEL)], next_prompt)
        return text.split(_SENTINEL, 1)[1]

    # -------------------------------------------------------------------------------------------- generation
    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  pixel_values: torch.Tensor | None = None, past_key_values: Any = None,
                  extra: dict[str, torch.Tensor] | None = None,
                  image_features: list[torch.Tensor] | None = None, decoding: Decoding | None = None) -> Any:
        decoding = decoding or Decoding()
        kwargs: dict[str, Any] = dict(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                      max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                      return_dict_in_generate=True, use_cache=True,
                                      pad_token_id=self.tokenizer.pad_token_id)
        if decoding.sample:
            # Greedy over Gumbel-perturbed logits, one generator per row: a row's draw is independent of its batch.
            from transformers import LogitsProcessorList

            from llavaseg.models.sampling import RowSampler, row_seed

            rows = [ids[keep.bool()].tolist() for ids, keep in zip(input_ids, attention_mask)]
            kwargs["logits_processor"] = LogitsProcessorList(
                [RowSampler([row_seed(decoding.seed, row) for row in rows], decoding.temperature)])
        if decoding.beams > 1:
            kwargs.update(num_beams=decoding.beams, num_return_sequences=decoding.beams, early_stopping=True)
        if decoding.constraint is not None:
            kwargs["prefix_allowed_tokens_fn"] = decoding.constraint(int(input_ids.shape[1]))
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values.to(self.device, dtype=self.model.dtype)
        if past_key_values is not None:
            kwargs[_cache_kwarg()] = past_key_values
        if image_features is not None:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            features = [feature.to(self.device) for feature in image_features]
            # handed back in the form the model's get_image_features returned: one stacked tensor or a list
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(
                pooler_output=torch.stack(features) if self._features_stacked else features)}
        for key, value in (extra or {}).items():
            kwargs[key] = value.to(self.device)
        self.row_calls += int(input_ids.shape[0])
        with torch.inference_mode():
            return self.model.generate(**kwargs)

    def _cached_image_features(self, images: list[np.ndarray], pixel_values: torch.Tensor,
                               extra: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
        """Vision features per image from the LRU cache, computing only the missing ones (one batch).

        Uses transformers' ``get_image_features`` + ``mm_encoder_outputs``; a model without them (or whose
        per-image inputs cannot be sliced) falls back to passing ``pixel_values`` every time.
        """
        if self._features_supported is False or not hasattr(self.model, "get_image_features"):
            return None
        from llavaseg.images import image_digest

        keys = [image_digest(image) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self._image_cache]
        if missing:
            try:
                subset = {k: v[missing] for k, v in extra.items() if isinstance(v, torch.Tensor)
                          and v.shape[:1] == pixel_values.shape[:1]}
                with torch.inference_mode():
                    output = self.model.get_image_features(
                        pixel_values=pixel_values[missing].to(self.device, dtype=self.model.dtype),
                        return_dict=True, **{k: v.to(self.device) for k, v in subset.items()})
                self._features_stacked = isinstance(output.pooler_output, torch.Tensor)
                features = list(output.pooler_output)
                if len(features) != len(missing):
                    raise ValueError("one feature tensor per image expected")
            except (TypeError, ValueError, RuntimeError, AttributeError):
                self._features_supported = False
                return None
            for index, feature in zip(missing, features):
                self._image_cache[keys[index]] = feature
        self._features_supported = True
        # Read this batch's features before evicting: an entry this batch hit must not be evicted for one it
        # added (and a batch larger than the cache still gets all of its features).
        batch = [self._image_cache[key] for key in keys]
        for key in keys:
            self._image_cache.move_to_end(key)
        while len(self._image_cache) > self.image_cache_size:
            self._image_cache.popitem(last=False)
        return batch

    def _strip(self, ids: list[int]) -> list[int]:
        """Drop padding, image placeholders and trailing end-of-sequence tokens from one generated row."""
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        # An image placeholder in a generated answer would be expanded into image features on the next turn.
        image_token = getattr(self.model.config, "image_token_id", getattr(self.model.config, "image_token_index", None))
        ids = [token for token in ids if (token != pad or pad == eos) and token != image_token]
        while ids and ids[-1] in (eos, pad):
            ids.pop()
        return ids

    def begin(self, images: list[np.ndarray], prompts: list[str], *, reuse_cache: bool = True,
              max_new_tokens: int | None = None) -> tuple[list[str], Conversation]:
        """First turn of one conversation per image, as one left-padded batch; returns answers and the state
        to continue from with :meth:`follow_up`."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        for prompt in prompts:
            self.check_prompt(prompt)
        texts = [self.render_chat([], prompt) for prompt in prompts]
        inputs = self._processor_inputs([Image.fromarray(image) for image in images], texts)
        pixel_values = inputs.pop("pixel_values")
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask").bool()
        per_token = {k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.shape == ids.shape}
        extra = {k: v for k, v in inputs.items() if k not in per_token}
        state = Conversation(first_prompts=list(prompts), rows=[row[keep].tolist() for row, keep in zip(ids, mask)],
                             pixel_values=pixel_values, extra=extra, reuse_cache=reuse_cache and len(images) == 1,
                             token_rows={k: [row[keep].tolist() for row, keep in zip(inputs[k], mask)]
                                         for k in per_token})
        if pixel_values.shape[0] == len(images):  # one row per image (not patches or tiles): features can be cached
            state.image_features = self._cached_image_features(images, pixel_values, extra)
        return self._advance(state, max_new_tokens), state

    def _processor_inputs(self, images: list[Image.Image], texts: list[str]) -> dict[str, Any]:
        """The processor's batch for one image per text. Some processors (Gemma 3) take a batch of images as
        one list per text; that form is tried when the flat one is refused."""
        try:
            return dict(self.processor(images=images, text=texts, return_tensors="pt", padding=True))
        except ValueError as flat_error:
            try:
                return dict(self.processor(images=[[image] for image in images], text=texts, return_tensors="pt",
                                           padding=True))
            except ValueError:
                raise flat_error from None

    def follow_up(self, state: Conversation, prompts: list[str], *, max_new_tokens: int | None = None,
                  decoding: Decoding | None = None) -> list[str]:
        """Next user turn of every conversation in ``state`` (continues its token ids and, if kept, its cache)."""
        self._add_user_turn(state, prompts)
        return self._advance(state, max_new_tokens, decoding)

    def _add_user_turn(self, state: Conversation, prompts: list[str]) -> None:
        if len(prompts) != len(state.rows):
            raise ValueError(f"{len(state.rows)} conversations but {len(prompts)} prompts")
        for prompt in prompts:
            self.check_prompt(prompt)
        for index, prompt in enumerate(prompts):
            suffix = self._continuation_text(state.first_prompts[index], prompt)
            if self._template_ends_answers_with_eos(state.first_prompts[index], prompt):
                # The answer row already ends with EOS (appended in _advance); do not tokenise it twice.
                suffix = suffix.lstrip(" ")[len(self.tokenizer.eos_token):]
            state.extend(index, self.tokenizer(suffix, add_special_tokens=False)["input_ids"])

    def follow_up_beams(self, state: Conversation, prompts: list[str], beams: int, *, constraint: Any = None,
                        max_new_tokens: int | None = None) -> list[list[str]]:
        """The ``beams`` most likely answers to the next user turn of each conversation (beam search, best first),
        recomputed from the conversation's ids; ``state`` itself is left unchanged."""
        work = self.fork(state)
        work.cache = None
        self._add_user_turn(work, prompts)
        input_ids, attention_mask = self._left_pad(work.rows)
        extra = {**work.extra, **{key: self._left_pad(rows, pad=0)[0] for key, rows in work.token_rows.items()}}
        features = {"image_features": work.image_features} if work.image_features is not None else {
            "pixel_values": work.pixel_values}
        output = self._generate(input_ids, attention_mask, max_new_tokens or self.max_new_tokens, extra=extra,
                                decoding=Decoding(beams=beams, constraint=constraint), **features)
        sequences = output.sequences[:, input_ids.shape[1]:].tolist()
        texts = [self.tokenizer.decode(self._strip(ids), skip_special_tokens=True).strip() for ids in sequences]
        return [texts[row * beams: (row + 1) * beams] for row in range(len(prompts))]

    def _advance(self, state: Conversation, max_new_tokens: int | None, decoding: Decoding | None = None
                 ) -> list[str]:
        max_new_tokens = max_new_tokens or self.max_new_tokens
        input_ids, attention_mask = self._left_pad(state.rows)
        extra = {**state.extra, **{key: self._left_pad(rows, pad=0)[0] for key, rows in state.token_rows.items()}}
        if state.cache is not None:
            output = self._generate(input_ids, attention_mask, max_new_tokens, past_key_values=state.cache,
                                    extra={k: v for k, v in extra.items() if k in state.token_rows},
                                    decoding=decoding)
        elif state.image_features is not None:
            output = self._generate(input_ids, attention_mask, max_new_tokens, extra=extra,
                                    image_features=state.image_features, decoding=decoding)
        else:
            output = self._generate(input_ids, attention_mask, max_new_tokens, pixel_values=state.pixel_values,
                                    extra=extra, decoding=decoding)
        answers = []
        eos = self.tokenizer.eos_token_id
        for index, new_ids in enumerate(output.sequences[:, input_ids.shape[1]:].tolist()):
            answer_ids = self._strip(new_ids)
            answers.append(self.tokenizer.decode(answer_ids, skip_special_tokens=True).strip())
            # In the conversation an answer always ends with end-of-sequence, emitted or not.
            state.extend(index, answer_ids + [eos])
        if state.reuse_cache:
            # The cache holds keys/values of every fed or generated position but the last. Keep the longest
            # prefix that agrees with the conversation ids (generation may have emitted tokens the answer drops);
            # the next turn feeds whatever the cache lacks.
            cache = getattr(output, _cache_kwarg())  # the old name warns where transformers renamed it
            fed = output.sequences[0].tolist()[: cache.get_seq_length()]
            row = state.rows[0]
            keep = 0
            while keep < min(len(fed), len(row) - 1) and fed[keep] == row[keep]:
                keep += 1
            if cache.get_seq_length() > keep:
                cache.crop(keep - cache.get_seq_length())
            state.cache = cache
        return answers

    def converse(self, images: list[np.ndarray], prompts: list[list[str]], *, reuse_cache: bool = True,
                 max_new_tokens: int | None = None) -> list[list[str]]:
        """Run fixed multi-turn conversations; ``prompts[i][k]`` is the user's k-th turn on ``images[i]``."""
        if not images:
            return []
        n_turns = len(prompts[0])
        if any(len(p) != n_turns for p in prompts) or n_turns == 0:
            raise ValueError("every conversation in a batch must have the same, non-zero number of turns")
        first, state = self.begin(images, [p[0] for p in prompts], reuse_cache=reuse_cache,
                                  max_new_tokens=max_new_tokens)
        answers = [[a] for a in first]
        for turn in range(1, n_turns):
            for row, answer in zip(answers, self.follow_up(state, [p[turn] for p in prompts],
                                                           max_new_tokens=max_new_tokens)):
                row.append(answer)
        return answers

    def _template_ends_answers_with_eos(self, first_prompt: str, next_prompt: str) -> bool:
        suffix = self._continuation_text(first_prompt, next_prompt)
        eos_text = self.tokenizer.eos_token or ""
        return bool(eos_text) and suffix.lstrip(" ").startswith(eos_text)

    def _left_pad(self, rows: list[list[int]], pad: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id if pad is None else pad
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[index, width - len(row):] = 1
        return ids, mask

    @staticmethod
    def fork(state: Conversation) -> Conversation:
        """An independent copy of a conversation (KV cache included), to continue it in several ways."""
        return copy.deepcopy(state)

    def choice_probabilities(self, images: list[np.ndarray], prompts: list[str], choices: tuple[str, ...]
                             ) -> np.ndarray:
        """``B x len(choices)``: the model's probabilities of each choice's first token as the start of its
        answer to a one-turn chat (renormalised over the choices). One forward pass, no generation."""
        for prompt in prompts:
            self.check_prompt(prompt)
        ids = [self.tokenizer(choice, add_special_tokens=False)["input_ids"][:1] for choice in choices]
        if any(not first for first in ids):
            raise InputError(f"choices {choices} must each start with a token")
        inputs = self._processor_inputs([Image.fromarray(image) for image in images],
                                        [self.render_chat([], prompt) for prompt in prompts])
        self.row_calls += len(images)
        with torch.inference_mode():
            logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).logits[:, -1]
        picked = logits[:, [first[0] for first in ids]].float()
        return torch.softmax(picked, dim=-1).cpu().numpy()

    def answer(self, images: list[np.ndarray], questions: list[str], *, max_new_tokens: int | None = None) -> list[str]:
        """The model's ordinary single-turn chat answer to each question (what users see in a chat UI)."""
        return [turns[0] for turns in self.converse(images, [[q] for q in questions],
                                                    max_new_tokens=max_new_tokens)]
