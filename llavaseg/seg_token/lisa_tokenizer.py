"""LISA's tokenizer, reproduced: transformers 4.31's slow LLaMA tokenizer over a release's ``tokenizer.model``.

Why a module of its own: LISA's ids come from its pinned transformers (4.31) and ``tokenizer_image_token``, and
transformers 5 tokenises the same folder differently in places that matter (``docs/lisa.md``;
:mod:`llavaseg.seg_token.lisa_checkpoint` explains the rules). Reading ``tokenizer.model`` needs
``sentencepiece`` (the ``lisa`` extra).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from transformers import AddedToken, PreTrainedTokenizer

from llavaseg.errors import CheckpointMismatchError, UnsupportedError
from llavaseg.seg_token.model import add_seg_token
from llavaseg.seg_token.prompts import SEG_TOKEN

__all__ = ["IM_START", "IM_END", "IMAGE", "IMAGE_TOKEN_INDEX", "LISA_EXTRA", "LisaLlamaTokenizer", "lisa_input_ids",
           "lisa_tokenizer"]

IM_START, IM_END, IMAGE = "<im_start>", "<im_end>", "<image>"
IMAGE_TOKEN_INDEX = -200
"""LLaVA's (and LISA's) id for the image in ``tokenizer_image_token``'s output (``model/llava/constants.py``)."""

LISA_EXTRA = "pip install 'llavaseg[lisa]'"


def _sentencepiece() -> Any:
    """The ``sentencepiece`` module (the ``lisa`` extra), or a one-line error naming the extra."""
    try:
        import sentencepiece
    except ImportError:
        raise UnsupportedError("reading a LISA release's slow LLaMA tokenizer (tokenizer.model) needs the "
                               f"sentencepiece package: {LISA_EXTRA}") from None
    return sentencepiece


class LisaLlamaTokenizer(PreTrainedTokenizer):
    """LISA's tokenizer as LISA runs it: transformers 4.31's slow ``LlamaTokenizer`` (``legacy=True``) under
    LLaVA's chunk-wise ``tokenizer_image_token`` (module docstring, "How LISA's prompts are tokenised").

    Why a class of its own: transformers 5 reads ``tokenizer.model`` into a fast tokenizer with other rules for
    whitespace next to added tokens, which changes LISA's prompt ids. ``stripped`` are the tokens LISA added with
    ``add_tokens`` (whitespace on both sides is removed, as 4.31 does for tokens that are not ``AddedToken``);
    ``<image>`` is our placeholder: the text is split on it first, so it strips nothing, like LISA's split.
    """

    vocab_files_names: ClassVar[dict[str, str]] = {"vocab_file": "tokenizer.model"}
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, *, stripped: Iterable[str] = (), add_bos_token: bool = True,
                 add_eos_token: bool = False, **kwargs: Any) -> None:
        self.vocab_file = vocab_file
        self.sp_model = _sentencepiece().SentencePieceProcessor(model_file=vocab_file)
        self.stripped = frozenset(stripped)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self._splitter: tuple[frozenset[str], re.Pattern[str] | None] = (frozenset(), None)
        super().__init__(**kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["sp_model"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.sp_model = _sentencepiece().SentencePieceProcessor(model_proto=state["sp_model"])

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None
                                         ) -> list[int]:
        """4.31 ``LlamaTokenizer``: ``[BOS] ids [EOS]`` per ``add_bos_token``/``add_eos_token``."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        return bos + token_ids_0 + eos + ([] if token_ids_1 is None else bos + token_ids_1 + eos)

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """``tokenizer_image_token``: each chunk around ``<image>`` tokenised on its own (4.31 rules), ``<image>``
        one token between them. BOS comes once, from :meth:`build_inputs_with_special_tokens`: LISA keeps the
        first chunk's BOS and drops the others'."""
        tokens: list[str] = []
        for index, chunk in enumerate(text.split(IMAGE)):
            if index:
                tokens.append(IMAGE)
            tokens.extend(self._tokenize_chunk(chunk))
        return tokens

    def _tokenize_chunk(self, text: str) -> list[str]:
        """transformers 4.31 ``PreTrainedTokenizer.tokenize`` + ``LlamaTokenizer._tokenize`` (legacy) on one chunk:
        split on added tokens (longest first), strip around the ``stripped`` ones, SentencePiece on the rest."""
        pattern = self._split_pattern()
        parts = pattern.split(text) if pattern is not None else [text]
        for i in range(1, len(parts), 2):  # odd parts are added tokens
            if parts[i] in self.stripped:
                parts[i + 1] = parts[i + 1].lstrip()
                parts[i - 1] = parts[i - 1].rstrip()
        tokens: list[str] = []
        for i, part in enumerate(parts):
            if i % 2:
                tokens.append(part)
            elif part:
                tokens.extend(self.sp_model.encode(part, out_type=str))
        return tokens

    def _split_pattern(self) -> re.Pattern[str] | None:
        """A regex splitting on every added token but ``<image>`` (rebuilt when tokens are added)."""
        names = frozenset(self._added_tokens_encoder) - {IMAGE}
        if self._splitter[0] != names:
            alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
            self._splitter = (names, re.compile(f"({alternatives})") if names else None)
        return self._splitter[1]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """4.31's decode: tokens added beyond the SentencePiece vocabulary (``[SEG]``...) stand alone and the parts
        are joined with spaces; runs of pieces are decoded by SentencePiece, ``<s>``/``</s>`` kept in place."""
        texts: list[str] = []
        run: list[str] = []
        for token in tokens:
            if self._added_tokens_encoder.get(token, -1) >= self.vocab_size:
                texts.extend([self._decode_pieces(run)] if run else [])
                texts.append(token)
                run = []
            else:
                run.append(token)
        texts.extend([self._decode_pieces(run)] if run else [])
        return " ".join(texts)

    def _decode_pieces(self, pieces: list[str]) -> str:
        out, run, after_special = "", [], False
        for i, piece in enumerate(pieces):
            if piece in self.all_special_tokens:
                out += (" " if i and not after_special else "") + self.sp_model.decode(run) + piece
                run, after_special = [], True
            else:
                run.append(piece)
                after_special = False
        return out + self.sp_model.decode(run)


def _json_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointMismatchError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointMismatchError(f"{path} does not hold a JSON object")
    return value


def _token_text(value: Any, default: str) -> str:
    """A special token as 4.31 saves it: a string or ``{"content": ...}`` (``__type: AddedToken``)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


def _slow_tokenizer(directory: Path) -> LisaLlamaTokenizer:
    """LISA's ``AutoTokenizer.from_pretrained(..., use_fast=False)`` + ``pad_token = unk_token`` on a release folder
    (``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``)."""
    model_file = directory / "tokenizer.model"
    if not model_file.is_file():
        raise CheckpointMismatchError(f"{directory} has no tokenizer.model (LISA reads its slow LLaMA tokenizer from "
                                      "it with use_fast=False)")
    config = _json_file(directory / "tokenizer_config.json")
    if config.get("legacy", True) is not True:
        raise UnsupportedError(f"{directory}: tokenizer_config.json sets legacy={config['legacy']!r}; LISA's "
                               "transformers 4.31 tokenizer is reproduced with legacy=True only")
    specials = _json_file(directory / "special_tokens_map.json")
    names = {key: _token_text(specials.get(key, config.get(key)), default)
             for key, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    names["pad_token"] = names["unk_token"]  # LISA: tokenizer.pad_token = tokenizer.unk_token
    tokenizer = LisaLlamaTokenizer(
        str(model_file), add_bos_token=bool(config.get("add_bos_token", True)),
        add_eos_token=bool(config.get("add_eos_token", False)), padding_side=config.get("padding_side", "right"),
        **{key: AddedToken(value, lstrip=False, rstrip=False, normalized=False, special=True)
           for key, value in names.items()})
    added = _json_file(directory / "added_tokens.json")
    _add_saved_tokens(tokenizer, added, directory, set(names.values()))
    return tokenizer


def _add_saved_tokens(tokenizer: LisaLlamaTokenizer, added: dict[str, Any], directory: Path,
                      specials: set[str]) -> None:
    """``added_tokens.json`` in id order, as 4.31's ``from_pretrained`` does, refusing ids it would refuse."""
    ordered = sorted(added.items(), key=lambda item: item[1] if isinstance(item[1], int) else -1)
    if IMAGE in added:
        raise UnsupportedError(f"{directory}/added_tokens.json adds {IMAGE!r} as a text token; LISA's releases do "
                               "not (it is LLaVA's image placeholder), and this loader reserves it for the image")
    for offset, (token, index) in enumerate(ordered):
        if index != tokenizer.vocab_size + offset:
            raise CheckpointMismatchError(f"{directory}/added_tokens.json: {token!r} has id {index!r}, expected "
                                          f"{tokenizer.vocab_size + offset} (ids follow tokenizer.model's vocabulary)")
        special = token != SEG_TOKEN  # LISA: add_tokens("[SEG]"); <im_start>/<im_end> with special_tokens=True
        tokenizer.add_tokens([AddedToken(token, lstrip=True, rstrip=True, normalized=False, special=special)],
                             special_tokens=special)
    tokenizer.stripped = frozenset(token for token, _ in ordered if token not in specials)


def lisa_tokenizer(directory: Path, vocab_size: int, use_im_start_end: bool) -> tuple[Any, int, int]:
    """LISA's saved tokenizer (``[SEG]`` checked) plus our ``<image>`` placeholder; (tokenizer, seg id, image id)."""
    tokenizer = _slow_tokenizer(directory)
    vocab = tokenizer.get_vocab()
    needed = [SEG_TOKEN] + ([IM_START, IM_END] if use_im_start_end else [])
    missing = [token for token in needed if token not in vocab]
    if missing:
        raise CheckpointMismatchError(f"{directory}: the tokenizer has no {', '.join(missing)} (not a LISA release)")
    seg_id = add_seg_token(tokenizer)
    if len(tokenizer) != vocab_size:
        raise CheckpointMismatchError(f"{directory}: tokenizer has {len(tokenizer)} tokens, weights {vocab_size}")
    tokenizer.add_tokens([AddedToken(IMAGE, lstrip=False, rstrip=False, normalized=False, special=True)],
                         special_tokens=True)
    return tokenizer, seg_id, tokenizer.convert_tokens_to_ids(IMAGE)


def lisa_input_ids(tokenizer: Any, prompt: str) -> list[int]:
    """LISA's ``input_ids`` for ``prompt`` (``tokenizer_image_token``: one ``IMAGE_TOKEN_INDEX`` per ``<image>``)
    with this loader's tokenizer, for comparing a prompt with what LISA's own code feeds its model."""
    ids = tokenizer(prompt)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    return [IMAGE_TOKEN_INDEX if token == image_id else token for token in ids]
