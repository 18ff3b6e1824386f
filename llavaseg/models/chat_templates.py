"""LLaVA's conversation formats written as Jinja chat templates, for ``processor.apply_chat_template``.

Models built here (the tiny LLaVAs) and checkpoints whose release has no template of its own (LISA's) go
through the same ``apply_chat_template`` call as llava-hf checkpoints, so a conversation is rendered by one
mechanism whatever the model.
"""

from __future__ import annotations

__all__ = ["llava_chat_template"]


def llava_chat_template(*, system: str = "", image: str = "<image>\n") -> str:
    """``[system ]USER: <image>\\n{text} ASSISTANT: {answer}</s>USER: ...``: LLaVA's ``llava_v1`` separators
    (sep " ", sep2 "</s>"), with ``image`` in place of the image and an optional system line."""
    return (
        (system + " " if system else "")
        + "{% for message in messages %}"
        "{% if message['role'] == 'user' %}USER: "
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + image + "{% endif %}{% endfor %}"
        "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
        "{% else %}ASSISTANT: "
        "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
        "</s>"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
