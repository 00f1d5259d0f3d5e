"""The conversation format the data pipeline trains on, as a Hugging Face (jinja) chat template.

`formats.build_conversation` renders a LLaVA conversation as

    <bos>USER: {human turn}\n ASSISTANT: {gpt turn}\n ... <eos>

with every `<image>` in a turn kept in place (tokenization expands it to the visual tokens). An
export stores `CHAT_TEMPLATE` with its tokenizer and processor, so
`processor.apply_chat_template(messages, add_generation_prompt=True)` gives a model exactly the
prompt it was trained on; tests/integration/test_export_generate.py checks that the token ids are
equal. Messages use the usual roles (`user`, `assistant`) and either a string content (with
`<image>` where an image goes) or a list of `{"type": "image"}` / `{"type": "text", "text": ...}`.
"""

from __future__ import annotations

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}"
    "{%- else -%}{{- raise_exception('only user and assistant roles were trained, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT: ' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"
)
