"""The chat template an export carries renders what the data pipeline trained on, and its LLaVA
processor expands `<image>` to exactly the model's visual tokens."""

from __future__ import annotations

import io
import types

from PIL import Image

from data_pipeline.chat_template import CHAT_TEMPLATE
from data_pipeline.formats import SampleRules, TextSegment, build_conversation
from data_pipeline.tokenize import TokenSpec, tokenize_sample
from mtrain.checkpoint.export import llava_processor
from mtrain.config.schema import TinyLlavaConfig
from mtrain.model.build import tiny_image_processor, tiny_llava_config
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer

QUESTION, ANSWER = "<image>\nWhat digit is this?", "seven"


def conversation() -> tuple[object, Image.Image]:
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    meta = {"conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]}
    return build_conversation("sample", {"png": buffer.getvalue()}, meta, SampleRules()), image


def tiny_processor():
    tokenizer = build_tiny_tokenizer()
    tiny = TinyLlavaConfig()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = tiny_llava_config(tiny, len(tokenizer), image_token_id, tokenizer.pad_token_id)
    built = types.SimpleNamespace(tokenizer=tokenizer, image_processor=tiny_image_processor(tiny.image_size))
    return llava_processor(config, built, CHAT_TEMPLATE), tiny.visual_tokens, image_token_id


def test_template_renders_the_trained_text():
    sample, _ = conversation()
    trained = "".join(s.text if isinstance(s, TextSegment) else IMAGE_TOKEN for s in sample.segments)
    processor, _, _ = tiny_processor()
    tokenizer = processor.tokenizer
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    assert rendered == f"{tokenizer.bos_token}{trained}{tokenizer.eos_token}"
    structured = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat digit is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
    ]
    assert processor.apply_chat_template(structured, tokenize=False) == rendered


def test_generation_prompt_gives_the_trained_token_ids_and_image_token_count():
    sample, image = conversation()
    processor, visual_tokens, image_token_id = tiny_processor()
    trained = tokenize_sample(sample, TokenSpec(processor.tokenizer, image_token_id, 512), visual_tokens).input_ids
    prompt = processor.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(image_token_id) == visual_tokens == 64
    assert ids == trained[: len(ids)]  # the prompt, token for token; the answer follows in training
    assert processor.tokenizer.decode(trained[len(ids) :], skip_special_tokens=True).strip() == f"{ANSWER}"
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)
