"""Schema-constrained decoding of the stage-2 answer: the MLLM can only write ``key : value ; ...`` with values
from a closed schema, one per key, in order.

Why here and how: a stage-2 answer that names a value the adapters never saw (or garbles the format) costs a
query; constraining the decoder removes that failure without touching the model. The constraint goes through
transformers' own ``prefix_allowed_tokens_fn`` (``PrefixConstrainedLogitsProcessor``): every admissible answer
is tokenised once with the model's tokenizer and kept in a token trie, and at each step only the tokens that
continue some admissible answer (or end a complete one) are allowed. Works for any tokenizer, word-level or
BPE, as long as the answer is generated as it is tokenised on its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llavaseg.attributes import ATTRIBUTE_KEYS
from llavaseg.errors import InputError

__all__ = ["attribute_answers", "TokenTrie", "attribute_constraint"]

MAX_ANSWERS = 200_000


def attribute_answers(values: Mapping[str, Sequence[str]], keys: Sequence[str] = ATTRIBUTE_KEYS) -> list[str]:
    """Every admissible stage-2 answer, in the shipped template's format (``color : red ; location : ...``)."""
    missing = [key for key in keys if not values.get(key)]
    if missing:
        raise InputError(f"the attribute schema gives no values for {missing}")
    count = 1
    for key in keys:
        count *= len(values[key])
    if count > MAX_ANSWERS:
        raise InputError(f"the attribute schema admits {count} answers (more than {MAX_ANSWERS}); narrow it")
    return [" ; ".join(f"{key} : {value}" for key, value in zip(keys, combo))
            for combo in itertools.product(*(values[key] for key in keys))]


class TokenTrie:
    """Token-id sequences as a trie: which ids may follow a prefix, and whether a prefix is complete."""

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        self.root: dict[int, Any] = {}
        for sequence in sequences:
            node = self.root
            for token in sequence:
                node = node.setdefault(int(token), {})
            node[-1] = {}  # end marker

    def next_tokens(self, prefix: Sequence[int]) -> tuple[list[int], bool]:
        """(ids that continue ``prefix``, whether ``prefix`` is a complete sequence); ``([], False)`` off-trie."""
        node = self.root
        for token in prefix:
            if int(token) not in node:
                return [], False
            node = node[int(token)]
        return [token for token in node if token != -1], -1 in node


def attribute_constraint(tokenizer: Any, values: Mapping[str, Sequence[str]]) -> Callable[[int], Callable]:
    """A :class:`~llavaseg.models.mllm.Decoding` ``constraint``: given the prompt width, a
    ``prefix_allowed_tokens_fn`` that keeps the answer inside the schema and ends it with EOS once complete."""
    sequences = [tokenizer(answer, add_special_tokens=False)["input_ids"] for answer in attribute_answers(values)]
    trie = TokenTrie(sequences)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def build(prompt_width: int) -> Callable[[int, Any], list[int]]:
        def allowed(_batch_id: int, input_ids: Any) -> list[int]:
            generated = [int(t) for t in input_ids[prompt_width:].tolist()]
            if generated and generated[-1] in (eos, pad):
                return [pad]  # finished rows keep padding
            following, complete = trie.next_tokens(generated)
            return following + ([eos] if complete else []) or [eos]

        return allowed

    return build
