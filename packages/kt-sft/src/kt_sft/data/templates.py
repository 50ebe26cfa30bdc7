"""Chat templates: the tokenizer's own, or the built-in ChatML one."""

from __future__ import annotations

from typing import Any

from kt_sft.data.records import DataError

__all__ = ["CHATML", "CHATML_SPECIAL_TOKENS", "render_chat", "resolve_template"]

#: ChatML: `<|im_start|>{role}\n{content}<|im_end|>\n` per turn, generation prompt for the
#: assistant. Prefix-stable (rendering turns[:i] is a prefix of rendering turns), which the loss
#: mask relies on.
CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")


def resolve_template(tokenizer: Any, template: str, *, tokenizer_path: str = "") -> str:
    """Return the Jinja chat template to use; raise DataError when `auto` finds none."""
    if template == "chatml":
        return CHATML
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: use the default one
        own = own.get("default") or next(iter(own.values()), None)
    if not own:
        where = f" at {tokenizer_path}" if tokenizer_path else ""
        raise DataError(
            f"the tokenizer{where} has no chat template, which the chat (messages) format needs: "
            "set `template: chatml` to use the built-in ChatML template, or use a tokenizer with "
            "a chat_template (tokenizer_config.json / chat_template.jinja)"
        )
    return own


def render_chat(
    tokenizer: Any,
    template: str,
    turns: list[dict[str, str]],
    *,
    add_generation_prompt: bool = False,
) -> str:
    """Render turns to text with `template` (no tokenization)."""
    try:
        return tokenizer.apply_chat_template(
            turns,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as exc:  # jinja raises TemplateError and friends
        raise DataError(
            f"the chat template failed on a conversation starting with {turns[0]['role']!r}: {exc}"
        ) from exc
