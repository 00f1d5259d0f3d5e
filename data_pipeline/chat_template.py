"""Conversations rendered by the model's own chat template, with labels on assistant turns only.

`ConversationTemplate` renders a LLaVA conversation ({from, value} turns) with a Hugging Face
(jinja) chat template, the one the loaded tokenizer carries (or `model.chat_template`), exactly as
`tokenizer.apply_chat_template` would. The assistant parts are found turn by turn: for every
assistant turn i, the text of turns [0, i) with the generation prompt is a prefix of the text of
turns [0, i], and the rest of that is the assistant's: its answer and its end-of-turn tokens,
learned; everything else (system prompt, user turns, role headers) is not. A template that does
not render turn by turn that way is refused with a clear error. The rendered text carries the
template's own BOS and end-of-turn tokens; tokenization adds none (`Sample.rendered`).

Messages are `{"role": "user" | "assistant" | "system", "content": [parts]}` with `{"type": "image"}`
where the turn's text has `<image>` and `{"type": "text", "text": ...}` for the text around it: the
structured form multimodal templates read. The template must render each image part as the
tokenizer's image token (`image_text`: `<image>`, or Qwen2-VL's `<|image_pad|>` between its
`<|vision_start|>` and `<|vision_end|>`, Gemma 3's `<image_soft_token>`), the placeholder tokenization
expands to the visual tokens; a template that renders a different number of them than the
conversation has images is refused (its images would otherwise fall out of the sample).

`CHAT_TEMPLATE` is the built-in tiny preset's: LLaVA-1.5's Vicuna-v1 shape
`<s>{system} USER: {question} ASSISTANT: {answer}</s>USER: ...`, with a shorter default system
prompt than LLaVA-1.5's ("A chat between a curious human and an artificial intelligence assistant.
..."), which the tiny byte-level tokenizer would spend most of a 96-token row on. It marks the
assistant parts with `{% generation %}`, so `apply_chat_template(..., return_assistant_tokens_mask=True)`
gives the mask training uses (tests/unit/test_chat_template.py checks they are equal). An export
stores the template its tokenizer trained with, so `processor.apply_chat_template(messages,
add_generation_prompt=True)` gives a model exactly the prompt it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGE_TEXT = "<image>"  # what a template renders for an image part: formats.IMAGE_PLACEHOLDER
TINY_SYSTEM_PROMPT = "A chat between a user and an assistant."


def message_text_template(image_text: str) -> str:
    """The jinja every structured template here shares: inside a loop over `message`, sets `text` to its
    content, the string itself or its parts joined, each image part written as `image_text` (the tokenizer's
    image token, with any markers around it)."""
    return (
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
        "{%- else -%}{%- set text = namespace(value='') -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{%- set text.value = text.value + '" + image_text + "' -%}"
        "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set text = text.value -%}"
        "{%- endif -%}"
    )


CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + TINY_SYSTEM_PROMPT + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- if system is not string -%}{%- set system = system | map(attribute='text') | join('') -%}{%- endif -%}"
    "{{- system + ' ' -}}"
    "{%- for message in turns -%}"
    + message_text_template(IMAGE_TEXT)
    + "{%- if message['role'] == 'user' -%}{{- 'USER: ' + text + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT:' -}}"
    "{%- generation -%}{{- ' ' + text + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}{{- raise_exception('a system message comes first; got role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


class ChatTemplateError(ValueError):
    """A conversation cannot be rendered: no template, or one that does not render turn by turn."""


def message_content(text: str) -> list[dict[str, str]]:
    """A turn's text as structured parts: an image part for every `<image>`, text parts around them."""
    parts: list[dict[str, str]] = []
    pieces = text.split(IMAGE_TEXT)
    for i, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if i < len(pieces) - 1:
            parts.append({"type": "image"})
    return parts


@dataclass(frozen=True)
class ConversationTemplate:
    """A jinja chat template and the special tokens it renders (plain strings: it travels to loader workers)."""

    template: str  # empty: the model has none, and conversations are refused with `missing`
    bos_token: str | None = None
    eos_token: str | None = None
    # What the template renders for an image part, the text the rendered conversation is split at into
    # images: the tokenizer's image token (`<image>` for LLaVA, `<|image_pad|>` for Qwen2-VL).
    image_text: str = IMAGE_TEXT
    missing: str = "the model's tokenizer has no chat template; set model.chat_template to render conversations"

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ConversationTemplate:
        template = tokenizer.chat_template
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default", "")
        image_text = getattr(tokenizer, "image_token", None) or IMAGE_TEXT
        return cls(template or "", tokenizer.bos_token, tokenizer.eos_token, image_text)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template  # noqa: PLC0415

        rendered, _ = render_jinja_template(
            conversations=[messages],
            chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        return rendered[0]

    def pieces(self, messages: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
        """The rendered conversation as (role, text, learned) pieces in reading order; only the
        assistant parts are learned."""
        if not self.template:
            raise ChatTemplateError(self.missing)
        whole = self.render(messages)
        images = sum(
            part.get("type") == "image" for m in messages if not isinstance(m["content"], str) for part in m["content"]
        )
        if whole.count(self.image_text) != images:
            # Else images would silently fall out of the sample: their placeholder is where they go.
            raise ChatTemplateError(
                f"the chat template renders {whole.count(self.image_text)} {self.image_text!r} for this conversation's "
                f"{images} image part(s); set model.chat_template to one that writes each image part as "
                f"{self.image_text!r}, the tokenizer's image token (a Gemma 3 folder's own template writes "
                "<start_of_image>, which its processor expands)"
            )
        pieces: list[tuple[str, str, bool]] = []
        done = 0
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:index], add_generation_prompt=True)
            through = self.render(messages[: index + 1])
            if not (whole.startswith(through) and through.startswith(prompt) and len(prompt) >= done):
                raise ChatTemplateError(
                    f"the chat template does not render turn by turn (assistant turn {index}: the prompt before it "
                    "is not a prefix of the conversation), so its assistant parts cannot be found; "
                    "set model.chat_template to one that does"
                )
            pieces.append(("user", whole[done : len(prompt)], False))
            pieces.append(("assistant", whole[len(prompt) : len(through)], True))
            done = len(through)
        pieces.append(("user", whole[done:], False))
        return [piece for piece in pieces if piece[1]]
