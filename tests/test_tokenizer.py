"""Tokenizer loading, special tokens and the tiny tokenizer, on tiny tokenizers written to temporary directories."""

import json
import random
from pathlib import Path

import pytest
import transformers

from gemma4.config import variant_config
from gemma4.special_tokens import ALL_SPECIAL_TOKENS, NEWLINE_ID
from gemma4.tiny_tokenizer import write_tiny_tokenizer
from gemma4.special_tokens import BOS, EOS, TOOL_RESPONSE_START, TURN_END, TURN_START
from gemma4.tokenizer import Gemma4Tokenizer, load_tokenizer

DATA = Path(__file__).parent / "data"
LARGE_TEMPLATE = (DATA / "gemma4-large-interleaved.jinja").read_text(encoding="utf-8")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path) -> Gemma4Tokenizer:
    return load_tokenizer(tiny_dir, variant="31b")


def test_special_tokens_sit_at_their_released_ids(tokenizer: Gemma4Tokenizer) -> None:
    assert tokenizer.vocab_size == 512
    for token in ALL_SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token.text)
        if token.id < 512:
            assert token_id == token.id, token.text
        else:
            # Multimodal tokens do not fit below 512: they take the top ids, in release order.
            assert 512 - 7 <= token_id < 512, token.text
        assert tokenizer.id_to_token(token_id) == token.text
    assert [tokenizer.token_to_id(t) for t in ("<|image>", "<|audio>", "<|video|>")] == [505, 506, 511]
    assert tokenizer.token_to_id("\n") == NEWLINE_ID
    assert tokenizer.id_to_token(512) is None
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id) == (2, 0)


def test_tokenizer_json_has_gemma_structure(tiny_dir: Path) -> None:
    data = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["normalizer"] == {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    assert data["pre_tokenizer"] == {
        "type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False
    }
    assert [d["type"] for d in data["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse"]
    model = data["model"]
    assert (model["type"], model["byte_fallback"], model["unk_token"]) == ("BPE", True, "<unk>")
    assert all(f"<0x{b:02X}>" in model["vocab"] for b in range(256))
    assert sorted(model["vocab"].values()) == list(range(512))
    assert {t["content"] for t in data["added_tokens"]} == {t.text for t in ALL_SPECIAL_TOKENS}
    assert all(t["special"] and not t["normalized"] for t in data["added_tokens"])
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (config["bos_token"], config["add_bos_token"], config["padding_side"]) == ("<bos>", False, "left")
    assert not (tiny_dir / "chat_template.jinja").exists()


def test_special_tokens_in_text_encode_to_single_ids(tokenizer: Gemma4Tokenizer) -> None:
    ids = tokenizer.encode("<|turn>user\nHi<turn|>\n")
    assert ids[0] == 105 and ids[-2:] == [106, 107]
    assert tokenizer.encode('<|"|><|tool_call><|image|>') == [52, 48, tokenizer.token_to_id("<|image|>")]
    assert tokenizer.encode("Hello")[0] != BOS.id  # no BOS is added


def test_ordinary_words_take_few_tokens(tokenizer: Gemma4Tokenizer) -> None:
    text = "The assistant writes a short answer about the weather in the city."
    assert len(tokenizer.encode(text)) <= len(text.split()) * 2


ROUND_TRIP_TEXTS = [
    "",
    "Hello, world!",
    "  leading, trailing and  double  spaces  ",
    "tabs\tand\r\nnewlines\n\n",
    "naïve café, Straße, Ελληνικά, русский",
    "東京は晴れです。中文测试，한국어",
    "emoji 🤖👍🏽 👨‍👩‍👧 and flags 🇫🇷",
    "combining e\u0301 and zero width\u200b joiner",
    "<|turn>user\ntext with <|channel>markers<channel|> and <0x41> literal<turn|>",
    "\x00\x01 control \x7f",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tokenizer: Gemma4Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_random_unicode(tokenizer: Gemma4Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(200):
        # Any code point but surrogates and "▁", which Gemma's normalizer cannot tell from a space.
        ranges = [(0x20, 0x7F), (0xA0, 0xD800), (0xE000, 0x110000)]
        chars = [chr(rng.randrange(*rng.choice(ranges))) for _ in range(rng.randint(1, 30))]
        text = "".join(c for c in chars if c != "▁")
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_skip_special_tokens(tokenizer: Gemma4Tokenizer) -> None:
    assert tokenizer.decode(tokenizer.encode("<|turn>model\nHi<turn|>"), skip_special_tokens=True) == "model\nHi"


def test_tiny_tokenizer_is_deterministic(tmp_path: Path, tiny_dir: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes()


def test_tiny_tokenizer_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too small"):
        write_tiny_tokenizer(tmp_path / "small", vocab_size=300)
    write_tiny_tokenizer(tmp_path / "big", vocab_size=1000)
    big = load_tokenizer(tmp_path / "big", variant="e2b")
    assert big.vocab_size == 1000
    assert big.token_to_id("<|video|>") == 999 and big.token_to_id("<unused0>") is not None
    assert big.decode(big.encode("Round trip ✓")) == "Round trip ✓"


def test_stop_ids_default_to_eos_turn_end_and_tool_response(tokenizer: Gemma4Tokenizer) -> None:
    assert tokenizer.eos_token_ids == (EOS.id, TURN_END.id, TOOL_RESPONSE_START.id)


@pytest.mark.parametrize(("eos", "expected"), [(1, (1,)), ([1, 106], (1, 106))])
def test_stop_ids_come_from_generation_config(tmp_path: Path, eos: int | list[int], expected: tuple[int, ...]) -> None:
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    assert load_tokenizer(tmp_path, variant="31b").eos_token_ids == expected


def test_chat_template_precedence(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path, variant="31b").chat_template is None
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config_file.write_text(json.dumps({**config, "chat_template": "from config"}))
    assert load_tokenizer(tmp_path, variant="31b").chat_template == "from config"
    (tmp_path / "chat_template.jinja").write_text("from file")
    assert load_tokenizer(tmp_path, variant="31b").chat_template == "from file"
    assert load_tokenizer(tmp_path, variant="31b").apply_chat_template(CHAT) == "from file"


def test_write_tiny_tokenizer_with_template(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path, chat_template=LARGE_TEMPLATE)
    assert load_tokenizer(tmp_path, variant="e2b").chat_template == LARGE_TEMPLATE


def test_apply_chat_template_uses_the_variant_flavour_without_a_template(tiny_dir: Path) -> None:
    large = load_tokenizer(tiny_dir, variant="26B-A4B").apply_chat_template(CHAT)
    small = load_tokenizer(tiny_dir, variant="E4B").apply_chat_template(CHAT)
    assert large == "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHello, world!<turn|>\n<|turn>model\n" + (
        "<|channel>thought\n<channel|>"
    )
    assert small == "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHello, world!<turn|>\n<|turn>model\n"


def test_encode_chat_writes_control_tokens_as_single_ids(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path, chat_template=LARGE_TEMPLATE)
    tokenizer = load_tokenizer(tmp_path, variant="31b")
    ids = tokenizer.encode_chat(CHAT, thinking=True)
    assert ids[:2] == [BOS.id, TURN_START.id]
    assert ids.count(BOS.id) == 1 and ids.count(TURN_START.id) == 3 and ids.count(TURN_END.id) == 2
    assert 98 in ids  # <|think|>
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT, thinking=True)


@pytest.mark.parametrize("family", ["e2b", "26b-a4b"])
def test_variant_defaults_to_the_config_family(tmp_path: Path, family: str) -> None:
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(variant_config(family).text.to_hf_dict()))
    assert load_tokenizer(tmp_path).variant == family


def test_variant_needs_a_config_when_not_given(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        load_tokenizer(tiny_dir)


def test_unknown_variant_is_rejected(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown Gemma 4 variant"):
        load_tokenizer(tiny_dir, variant="gemma3")


def test_missing_and_malformed_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path, variant="31b")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path, variant="31b")
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="generation_config.json"):
        load_tokenizer(tmp_path, variant="31b")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "<eos>"}))
    with pytest.raises(ValueError, match="generation_config.json"):
        load_tokenizer(tmp_path, variant="31b")
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path, variant="31b")


def test_transformers_reads_the_tiny_tokenizer_identically(tiny_dir: Path, tokenizer: Gemma4Tokenizer) -> None:
    reference = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    text = "<|turn>user\nHello 世界 🤖, the weather?<turn|>\n"
    assert reference.encode(text) == tokenizer.encode(text)
    assert (reference.image_token, reference.boi_token) == ("<|image|>", "<|image>")
