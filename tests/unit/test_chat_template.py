"""Conversations are rendered by the tokenizer's own chat template: the tiny preset's is LLaVA-1.5's
shape, the token ids and label mask equal `apply_chat_template`'s (assistant mask), an export's
processor gives the trained prompt, and a model without a template is refused, not defaulted."""

from __future__ import annotations

import io
import json
import types

import pytest
from PIL import Image

from data_pipeline.chat_template import ChatTemplateError, ConversationTemplate
from data_pipeline.formats import SampleRules, TextSegment, build_conversation, conversation_messages
from data_pipeline.tokenize import IGNORE_INDEX, TokenSpec, tokenize_sample
from mtrain.checkpoint.export import llava_processor
from mtrain.config.schema import TinyLlavaConfig
from mtrain.model.build import tiny_image_processor, tiny_llava_config
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer

QUESTION, ANSWER = "<image>\nWhat digit is this?", "seven"
TWO_TURNS = [
    {"from": "human", "value": QUESTION},
    {"from": "gpt", "value": ANSWER},
    {"from": "human", "value": "And its colour?"},
    {"from": "gpt", "value": "It is red."},
]


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def conversation(tokenizer, turns=TWO_TURNS[:2]):
    meta = {"conversations": turns}
    rules = SampleRules(chat=ConversationTemplate.from_tokenizer(tokenizer))
    return build_conversation("sample", {"png": png()}, meta, rules)


def tiny_processor():
    tokenizer = build_tiny_tokenizer()
    tiny = TinyLlavaConfig()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = tiny_llava_config(tiny, len(tokenizer), image_token_id, tokenizer.pad_token_id)
    built = types.SimpleNamespace(tokenizer=tokenizer, image_processor=tiny_image_processor(tiny.image_size))
    return llava_processor(config, built, tokenizer.chat_template), tiny.visual_tokens, image_token_id


def test_the_tiny_template_has_llava_15s_shape_with_a_system_prompt():
    tokenizer = build_tiny_tokenizer()
    messages = conversation_messages(TWO_TURNS)
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<s>A chat between a user and an assistant. USER: <image>\nWhat digit is this? ASSISTANT: seven</s>"
        "USER: And its colour? ASSISTANT: It is red.</s>"
    )
    system = [{"role": "system", "content": "Answer briefly."}, *messages[:1]]
    prompt = tokenizer.apply_chat_template(system, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>Answer briefly. USER: <image>\nWhat digit is this? ASSISTANT:"


def test_two_turns_give_apply_chat_templates_token_ids_and_assistant_mask():
    tokenizer = build_tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    sample = conversation(tokenizer, TWO_TURNS)
    # One visual token per image, so the ids line up with the template's single <image> token.
    tokens = tokenize_sample(sample, TokenSpec(tokenizer, image_token_id, 512), 1)
    reference = tokenizer.apply_chat_template(
        conversation_messages(TWO_TURNS), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert tokens.input_ids == reference["input_ids"]
    assert [int(label != IGNORE_INDEX) for label in tokens.labels] == reference["assistant_masks"]
    learned = [i for i, label in zip(tokens.input_ids, tokens.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == " seven</s> It is red.</s>"  # both answers and their end-of-turn tokens
    assert tokens.input_ids.count(tokenizer.bos_token_id) == 1 and tokens.input_ids[-1] == tokenizer.eos_token_id


def test_a_cut_conversation_keeps_whole_turns_with_their_own_end_tokens():
    tokenizer = build_tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    whole = tokenize_sample(conversation(tokenizer, TWO_TURNS), TokenSpec(tokenizer, image_token_id, 512), 1)
    first = tokenize_sample(conversation(tokenizer, TWO_TURNS[:2]), TokenSpec(tokenizer, image_token_id, 512), 1)
    cut = tokenize_sample(conversation(tokenizer, TWO_TURNS), TokenSpec(tokenizer, image_token_id, len(whole) - 1), 1)
    assert cut.input_ids == first.input_ids and cut.labels == first.labels  # ends with the first turn's </s>


def test_template_renders_the_trained_text():
    processor, _, _ = tiny_processor()
    sample = conversation(processor.tokenizer)
    trained = "".join(s.text if isinstance(s, TextSegment) else IMAGE_TOKEN for s in sample.segments)
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    assert processor.apply_chat_template(messages, tokenize=False) == trained
    structured = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat digit is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
    ]
    assert processor.apply_chat_template(structured, tokenize=False) == trained


def test_generation_prompt_gives_the_trained_token_ids_and_image_token_count():
    processor, visual_tokens, image_token_id = tiny_processor()
    sample = conversation(processor.tokenizer)
    trained = tokenize_sample(sample, TokenSpec(processor.tokenizer, image_token_id, 512), visual_tokens).input_ids
    prompt = processor.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    inputs = processor(images=Image.open(io.BytesIO(png())), text=prompt, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(image_token_id) == visual_tokens == 64
    assert ids == trained[: len(ids)]  # the prompt, token for token; the answer follows in training
    assert processor.tokenizer.decode(trained[len(ids) :], skip_special_tokens=True).strip() == f"{ANSWER}"
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)


def test_a_model_without_a_template_is_refused_or_takes_the_configured_one(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template; set model.chat_template"):
        conversation(tokenizer)
    from mtrain.config import load_config
    from mtrain.model.build import build_model

    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'][0]['text'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    cfg = load_config(None, [f"model.chat_template={json.dumps(template)}"])
    built = build_model(cfg.model, __import__("torch").float32, None, seed=0)
    assert built.tokenizer.chat_template == template
    sample = conversation(built.tokenizer, [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}])
    assert [(s.text, s.learned) for s in sample.segments] == [("user: hi\nassistant:", False), (" red\n", True)]
