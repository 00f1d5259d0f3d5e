"""A byte-level BPE tokenizer trained in memory, so the tiny preset needs no download."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerFast

from data_pipeline.chat_template import CHAT_TEMPLATE
from data_pipeline.formats import IMAGE_PLACEHOLDER

IMAGE_TOKEN = IMAGE_PLACEHOLDER  # one special token stands where text says <image>
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]

# Text the tiny tokenizer learns its merges from: the words of the sample and digit data sets
# plus common English, so any caption still encodes (byte-level, never <unk>).
_CORPUS_WORDS = """
a an the of in on with and is this image shows picture photo handwritten digit number which what
red green blue yellow orange purple white black cyan magenta gray pink brown
circle square triangle cross ring diamond star plus shape small large big
zero one two three four five six seven eight nine
question answer user assistant describe it there are here
""".split()


def train_tiny_bpe(special_tokens: list[str], vocab_size: int = 512) -> Any:
    """A deterministic byte-level BPE `tokenizers.Tokenizer` over the tiny corpus, with `special_tokens` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sentences = [" ".join(_CORPUS_WORDS[i : i + 6]) for i in range(len(_CORPUS_WORDS))]
    sentences += [f" {w}" for w in _CORPUS_WORDS] + [f"a {w}." for w in _CORPUS_WORDS]
    tokenizer.train_from_iterator(sentences * 4, trainer=trainer)
    return tokenizer


def build_tiny_tokenizer(
    vocab_size: int = 512, chat_template: str = CHAT_TEMPLATE, turn_tokens: tuple[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer with `<image>` as a special token and the tiny preset's
    LLaVA-1.5-shaped chat template, or another family's `chat_template`.

    `turn_tokens` (start, end), e.g. ChatML's `<|im_start|>`, `<|im_end|>`, become special tokens;
    the end token is then the eos token and there is no bos token, as in Qwen2's tokenizers."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_tiny_bpe(SPECIAL_TOKENS + list(turn_tokens or ()), vocab_size),
        chat_template=chat_template,  # by default LLaVA-1.5's shape (data_pipeline/chat_template.py)
        bos_token=None if turn_tokens else "<s>",
        eos_token=turn_tokens[1] if turn_tokens else "</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def pad_stand_in(tokenizer: Any) -> str | None:
    """The token a tokenizer without a pad token pads with: its eos token, else its unk token (None: neither).

    Padding positions never count (labels are IGNORE_INDEX, attention masks or packed position ids
    leave them out), so any id works; eos is the usual choice for decoder models."""
    return tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token


def pad_with_eos_or_unk(tokenizer: Any) -> str:
    """Give a tokenizer without a pad token its `pad_stand_in` as one; returns a note saying so, or ''.
    A tokenizer with no stand-in is refused before training starts (mtrain/launch/model_checks.py)."""
    if tokenizer.pad_token is not None:
        return ""
    stand_in = pad_stand_in(tokenizer)
    if stand_in is None:
        raise ValueError("the tokenizer has no pad token and no eos or unk token to pad with; set tokenizer.pad_token")
    tokenizer.pad_token = stand_in
    return f"the tokenizer has no pad token; padding with {stand_in!r} (id {tokenizer.pad_token_id}), never learned"
