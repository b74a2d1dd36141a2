"""A small, deterministic tokenizer with the real Gemma 4 structure, for tiny random-weight models.

The platform serves tiny models (tests, smoke deployments) that cannot carry the 262 144-entry vocabulary.
This writes a stand-in with the same moving parts as the released ``tokenizer.json``: BPE with byte
fallback (``<0x00>``..``<0xFF>``), a normalizer turning " " into "▁", a pre-tokenizer splitting on " "
merged with the previous piece (a no-op after that normalizer, exactly as in the real file), a decoder
that undoes all of it, no prefix space, and every Gemma 4 special token registered as a special added
token. Special tokens keep their released ids where they fit below ``vocab_size`` ("\\n" stays 107); the
others (the multimodal ones) take the highest free ids. The remaining ids hold merges learned from a fixed
built-in English text, so ordinary words take few tokens, then ``<unusedN>`` fillers up to ``vocab_size``.

Round trip: ``decode(encode(s)) == s`` for every string without the "▁" character itself, which the
real tokenizer also turns into a space.
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from gemma4.special_tokens import (
    ALL_SPECIAL_TOKENS,
    AUDIO,
    AUDIO_END,
    AUDIO_START,
    BOS,
    CHANNEL_END,
    CHANNEL_START,
    EOS,
    IMAGE,
    IMAGE_END,
    IMAGE_START,
    MASK,
    NEWLINE_ID,
    PAD,
    STRING_DELIMITER,
    THINK,
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_END,
    TOOL_RESPONSE_END,
    TOOL_RESPONSE_START,
    TOOL_START,
    TURN_END,
    TURN_START,
    UNK,
    VIDEO,
)

SPACE = "▁"
_BYTE_TOKENS = tuple(f"<0x{value:02X}>" for value in range(256))

# Fixed training text: the merges (and so the whole file) depend only on this and vocab_size.
_CORPUS = """\
The assistant reads the question and writes a short, clear answer.
When the user asks about the weather, the model can call a tool to get the forecast for a city.
It is sunny in Paris today, and tomorrow there will be rain in the north and wind on the coast.
A good answer is helpful, honest and kind. If the question is not clear, the assistant asks again.
Please tell me what time it is in Tokyo, London and New York.
The temperature is 21 degrees in the morning and 27 degrees in the afternoon.
She opened the window, looked at the garden and smiled at the small birds on the grass.
We will meet at the station at nine o'clock and then walk to the museum together.
This function returns a list of numbers, one for each line in the file.
Write a story about a dog who finds a lost key under the old tree near the river.
Thank you for your help! I have one more question about the report from last week.
The first step is to load the model, then we send the prompt and read the tokens it generates.
Images, audio and video can be part of a message, and the model describes what it sees and hears.
Children like to play outside when the days are long and the evenings are warm.
There are three reasons why this plan works: it is simple, it is cheap, and it is fast.
He said that the meeting was moved to Monday because the room was not free on Friday.
Can you translate this sentence into French, German and Spanish for me?
The server keeps a cache of recent requests so that the same work is not done twice.
Summer is the best time to visit the mountains, but winter has its own quiet beauty.
Reading books every day makes your mind sharp and your words more precise.
The user, the model and the system each take a turn in the conversation.
"""

# Strings tokenizer_config.json names under transformers' attribute names for Gemma 4.
_NAMED_TOKENS = {
    "image_token": IMAGE,
    "boi_token": IMAGE_START,
    "eoi_token": IMAGE_END,
    "audio_token": AUDIO,
    "boa_token": AUDIO_START,
    "eoa_token": AUDIO_END,
    "video_token": VIDEO,
    "sot_token": TURN_START,
    "eot_token": TURN_END,
    "soc_token": CHANNEL_START,
    "eoc_token": CHANNEL_END,
    "think_token": THINK,
    "escape_token": STRING_DELIMITER,
    "str_token": TOOL_RESPONSE_START,
    "etr_token": TOOL_RESPONSE_END,
    "stc_token": TOOL_CALL_START,
    "etc_token": TOOL_CALL_END,
    "std_token": TOOL_START,
    "etd_token": TOOL_END,
}


def write_tiny_tokenizer(directory: str | Path, *, vocab_size: int = 512, chat_template: str | None = None) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and, if given, ``chat_template.jinja`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(vocab_size)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "padding_side": "left",
        "bos_token": BOS.text,
        "eos_token": EOS.text,
        "pad_token": PAD.text,
        "unk_token": UNK.text,
        "mask_token": MASK.text,
        "extra_special_tokens": {name: token.text for name, token in _NAMED_TOKENS.items()},
    }
    config_text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (directory / "tokenizer_config.json").write_text(config_text, encoding="utf-8")
    if chat_template is not None:
        (directory / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def build_tiny_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """The tokenizer ``write_tiny_tokenizer`` saves, built in memory."""
    # Every special token and "\n" either keeps its id or is displaced into a free one; bytes take 256 more.
    budget = vocab_size - len(ALL_SPECIAL_TOKENS) - 1 - len(_BYTE_TOKENS)
    learned, merges = _train(budget)
    if len(learned) > budget:
        minimum = vocab_size - budget + len(learned)
        raise ValueError(f"vocab_size {vocab_size} is too small for the tiny tokenizer; it needs at least {minimum}")
    tokenizer = Tokenizer(
        models.BPE(
            vocab=_layout(vocab_size, learned), merges=merges, unk_token=UNK.text, fuse_unk=True, byte_fallback=True
        )
    )
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens(
        [AddedToken(token.text, special=True, normalized=False) for token in ALL_SPECIAL_TOKENS]
    )
    return tokenizer


def _train(budget: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Tokens learned from the corpus (alphabet first, then merge results) and the merges producing them."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK.text))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    # Training splits at "▁" so merges stay inside words; the saved tokenizer then never needs to split.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(SPACE, behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=max(budget, 0), show_progress=False, special_tokens=[])
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    vocab = tokenizer.get_vocab()
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return sorted(vocab, key=vocab.__getitem__), [(left, right) for left, right in merges]


def special_token_ids(vocab_size: int = 512) -> dict[str, int]:
    """Text -> id of every special token and "\\n" in the tiny vocabulary of ``vocab_size`` (no training needed)."""
    ids = {token.text: token.id for token in ALL_SPECIAL_TOKENS if token.id < vocab_size}
    ids["\n"] = NEWLINE_ID
    taken = set(ids.values())
    free = [token_id for token_id in range(vocab_size) if token_id not in taken]
    displaced = [token.text for token in ALL_SPECIAL_TOKENS if token.id >= vocab_size]
    if len(displaced) > len(free):
        raise ValueError(f"vocab_size {vocab_size} has no room for the special tokens")
    # Displaced special tokens go to the top of the vocabulary, in release order.
    ids.update(zip(displaced, free[len(free) - len(displaced) :], strict=True))
    return ids


def _layout(vocab_size: int, learned: list[str]) -> dict[str, int]:
    """Token -> id for every id below ``vocab_size``: special tokens, "\\n", bytes, learned tokens, fillers."""
    vocab = special_token_ids(vocab_size)
    taken = set(vocab.values())
    free = [token_id for token_id in range(vocab_size) if token_id not in taken]
    fillers = [f"<unused{n}>" for n in range(len(free) - len(_BYTE_TOKENS) - len(learned))]
    vocab.update(zip([*_BYTE_TOKENS, *learned, *fillers], free, strict=True))
    return vocab
