"""A multi-turn chat with the frozen MLLM about one image, where any turn can also ask for a mask.

The chat talks to the *same* frozen MLLM the routes reason with (the session's components), through
:meth:`FrozenMLLM.begin` and :meth:`FrozenMLLM.follow_up`: turn *k+1* continues turn *k*'s token ids and key/value
cache, so what a visitor sees is the base model's own conversation, which the LLaVASeg route leaves untouched.
A turn marked "segment" also runs the chosen route on that turn's text and adds the overlay to the history.

The state is per browser session (Gradio keeps it in a ``gr.State``); a new image starts a new conversation,
because the conversation's image tokens are fixed at its first turn. Nothing here imports Gradio: messages are
the plain ``{"role", "content"}`` dicts its chatbot shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llavaseg.demo.session import DemoSession, SavedResult
from llavaseg.errors import InputError
from llavaseg.images import check_query, image_digest, limit_query
from llavaseg.models.mllm import Conversation, FrozenMLLM

__all__ = ["ChatState", "ChatTurn", "chat_turn", "context_limit"]

TEMPLATE_ALLOWANCE = 32
"""Tokens reserved for the chat template's text between an answer and the next user turn."""


@dataclass
class ChatState:
    """One visitor's conversation: the image it is about (by content), the MLLM's state, the messages shown."""

    digest: str | None = None
    conversation: Conversation | None = None
    messages: list[dict[str, object]] = field(default_factory=list)


@dataclass
class ChatTurn:
    """What one turn produced: the answer and, when asked for, the mask of that turn's text."""

    answer: str
    segmentation: SavedResult | None = None
    notices: list[str] = field(default_factory=list)


def context_limit(mllm: FrozenMLLM) -> int | None:
    """The language model's longest sequence (``max_position_embeddings``), if its config says."""
    config = getattr(mllm.model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    limit = getattr(text_config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) else None


def _check_room(mllm: FrozenMLLM, conversation: Conversation, text: str) -> None:
    """Refuse a turn that would run past the model's context, with a way out (Clear), instead of a crash or
    silently degraded answers deep inside generation."""
    limit = context_limit(mllm)
    if limit is None:
        return
    used = len(conversation.rows[0])
    needed = len(mllm.tokenizer(text, add_special_tokens=False)["input_ids"]) + TEMPLATE_ALLOWANCE
    if used + needed + mllm.max_new_tokens > limit:
        raise InputError(f"the conversation is too long for this model ({used} of {limit} tokens used); press "
                         "Clear to start a new one")


def _answer(session: DemoSession, state: ChatState, image: np.ndarray, text: str) -> str:
    """The frozen MLLM's answer to ``text``: the first turn of a conversation, or its next one."""
    mllm = session.mllm
    mllm.check_prompt(text)
    if state.conversation is None:
        answers, state.conversation = mllm.begin([image], [text])
        return answers[0]
    _check_room(mllm, state.conversation, text)
    try:
        return mllm.follow_up(state.conversation, [text])[0]
    except BaseException:
        state.conversation = None  # half-extended token rows: the next turn starts a fresh conversation
        raise


def chat_turn(session: DemoSession, state: ChatState | None, image: np.ndarray, text: object, *,
              segment: bool = False, route: str = "llavaseg") -> tuple[ChatState, ChatTurn]:
    """One user turn on ``image``: the MLLM answers (continuing the conversation) and, if ``segment``, the
    route segments what the turn says. Returns the updated state (its ``messages`` include this turn)."""
    try:
        text, cut = limit_query(check_query(text))
    except InputError as error:
        raise InputError("type a message first" if str(error) == "query is empty" else str(error)) from None
    digest = image_digest(image)
    if state is None or state.digest != digest:
        restarted = state is not None and bool(state.messages)
        state = ChatState(digest=digest)
        if restarted:
            state.messages.append({"role": "assistant", "content": "_(new image: a new conversation)_"})
    with session.lock:
        answer = _answer(session, state, image, text)
        saved = session.segment(image, text, route, keep=True) if segment else None
    turn = ChatTurn(answer, saved, [cut] if cut else [])
    state.messages.append({"role": "user", "content": text})
    state.messages.append({"role": "assistant", "content": answer or "_(empty answer)_"})
    if saved is not None:
        caption = (f"Mask from route `{route}` ({int(saved.result.mask.sum())} px): "
                   f"{saved.result.description or '—'}")
        state.messages.append({"role": "assistant", "content": caption})
        state.messages.append({"role": "assistant", "content": {"path": str(saved.overlay_png),
                                                                "alt_text": caption}})
    return state, turn
