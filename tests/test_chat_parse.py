"""Parsing generated text: thinking, answer, Gemma-syntax tool calls, whole and streamed."""

import random

import pytest

from gemma4.chat import (
    ChatDelta,
    ParsedOutput,
    StreamParser,
    ToolCall,
    ToolCallParseError,
    format_tool_arguments,
    parse,
    parse_tool_arguments,
    render,
)

Q = '<|"|>'
TRICKY_ARGUMENTS = {
    "query": 'a: b, {c} [d] "e"\nf \'g\' \\ <|channel>',
    "limits": {"max": 10, "min": -2500.0, "ratio": 0.5},
    "tags": ["x", [1, 2], {"k": None}],
    "flag": False,
    "on": True,
    "nothing": None,
    "empty": {},
    "none": [],
    "unicode": "naïve 東京 🤖",
}


def test_thinking_then_answer() -> None:
    parsed = parse("<|channel>thought\nLet me add: 2+2.<channel|>The answer is 4.<turn|>")
    assert parsed == ParsedOutput(thinking="Let me add: 2+2.", content="The answer is 4.", tool_calls=[], errors=[])


@pytest.mark.parametrize(
    ("text", "thinking", "content"),
    [
        ("<|channel>Reasoning without a label<channel|>Answer", "Reasoning without a label", "Answer"),
        ("<|channel>thought\n<channel|>Hi", "", "Hi"),
        ("Just text<eos>", None, "Just text"),
        ("Plain text, no stop token", None, "Plain text, no stop token"),
        ("<|channel>thought\ncut off mid-thought", "cut off mid-thought", ""),
        ("<|channel>though", "though", ""),
        ("a < b and c <| d <turn|>ignored after the stop", None, "a < b and c <| d "),
        ("stray <channel|>closer and <tool_call|> dropped", None, "stray closer and  dropped"),
    ],
)
def test_thinking_and_content_edge_cases(text: str, thinking: str | None, content: str) -> None:
    parsed = parse(text)
    assert (parsed.thinking, parsed.content, parsed.tool_calls, parsed.errors) == (thinking, content, [], [])


def test_several_tool_calls_in_a_row() -> None:
    text = (
        "<|channel>thought\nNeed both.<channel|>"
        f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"
        f"<|tool_call>call:get_time{{zone:{Q}CET{Q},hour24:true}}<tool_call|><|tool_response>"
    )
    parsed = parse(text)
    assert parsed.thinking == "Need both."
    assert parsed.content == ""
    assert parsed.tool_calls == [
        ToolCall("get_weather", {"city": "Paris"}),
        ToolCall("get_time", {"zone": "CET", "hour24": True}),
    ]
    assert parsed.errors == []


def test_nested_arguments_with_tricky_strings() -> None:
    text = f"<|tool_call>call:search{format_tool_arguments(TRICKY_ARGUMENTS)}<tool_call|>"
    assert parse(text).tool_calls == [ToolCall("search", TRICKY_ARGUMENTS)]


def test_arguments_syntax_details() -> None:
    text = f" {{ a : 1 , {Q}quoted key{Q}:[ ] ,b:1e+20, c:-7, d:None , e : {{ }} }} "
    assert parse_tool_arguments(text) == {"a": 1, "quoted key": [], "b": 1e20, "c": -7, "d": None, "e": {}}
    assert format_tool_arguments({"b": 1, "A": "x", "c": {"Z": True, "y": None}}) == (
        f"{{A:{Q}x{Q},b:1,c:{{y:None,Z:true}}}}"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (f"call:f{{a:{Q}unterminated}}", "unterminated string"),
        ("call:f{a:bareword}", "expected a value"),
        ("call f{a:1}", "must start with 'call:'"),
        ("call:{a:1}", "invalid function name"),
        ("call:my func{a:1}", "invalid function name"),
        ("call:f", "no '{'"),
        ("call:f{a:1}trailing", "unexpected text"),
        ("call:f{a:1,}", "expected a key"),
        ("call:f{a 1}", "expected ':'"),
        ("call:f{a:[1 2]}", "expected ','"),
        ("call:f{a:12abc}", "expected a value"),
    ],
)
def test_malformed_calls_are_kept_as_text_and_reported(body: str, message: str) -> None:
    raw = f"<|tool_call>{body}<tool_call|>"
    parsed = parse(f"Before {raw} after<turn|>")
    assert parsed.tool_calls == []
    assert parsed.content == f"Before {raw} after"
    assert len(parsed.errors) == 1 and message in parsed.errors[0]


def test_malformed_arguments_raise_a_clear_error() -> None:
    with pytest.raises(ToolCallParseError, match=r"expected ':' at offset 3"):
        parse_tool_arguments("{ab}")


def test_unterminated_call_is_reported() -> None:
    parsed = parse("Let me check. <|tool_call>call:f{a:1")
    assert parsed.content == "Let me check. <|tool_call>call:f{a:1"
    assert parsed.tool_calls == []
    assert parsed.errors and "unterminated tool call" in parsed.errors[0]
    cut = parse("<|tool_call>call:f{a:1<turn|>")
    assert cut.content == "<|tool_call>call:f{a:1" and "cut off by <turn|>" in cut.errors[0]


@pytest.mark.parametrize("variant", ["31b", "e2b"])
def test_rendered_tool_calls_parse_back(variant: str) -> None:
    calls = [("search", TRICKY_ARGUMENTS), ("get_weather", {"city": "Paris", "days": 3})]
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [{"function": {"name": n, "arguments": a}} for n, a in calls]},
    ]
    prompt = render(messages, variant=variant, add_generation_prompt=False)
    generated = prompt.rsplit("<|turn>model\n", 1)[1]
    assert parse(generated) == ParsedOutput(None, "", [ToolCall(n, a) for n, a in calls], [])


STREAM_TEXTS = [
    "<|channel>thought\nLet me add: 2+2.<channel|>The answer is 4.<turn|>",
    "<|channel>Reasoning<channel|>Answer <b>bold</b> a<b<turn|>",
    "<|channel>thought\n<channel|>Hi",
    "<|channel>thought",
    "<|channel>thought\nstill thinking when the stream ends",
    f"<|channel>thought\nNeed both.<channel|><|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"
    f"<|tool_call>call:search{format_tool_arguments(TRICKY_ARGUMENTS)}<tool_call|><|tool_response>",
    f"Before <|tool_call>call:f{{a:{Q}unterminated}}<tool_call|> after <|tool_call>call:g{{}}<tool_call|><eos>",
    "Let me check. <|tool_call>call:f{a:1",
    "text <channel|> with stray closers <tool_call|> and <| partial <|chan markers",
    "a < b <turn|>ignored <|channel>after stop",
]


def _collect(events: list[ChatDelta], parser: StreamParser) -> ParsedOutput:
    return ParsedOutput(
        thinking="".join(e.text for e in events if e.kind == "thinking") if parser.thinking_started else None,
        content="".join(e.text for e in events if e.kind == "content"),
        tool_calls=[e.tool_call for e in events if e.kind == "tool_call"],
        errors=[e.text for e in events if e.kind == "error"],
    )


def _stream(pieces: list[str]) -> tuple[list[ChatDelta], StreamParser]:
    parser = StreamParser()
    events = [event for piece in pieces for event in parser.feed(piece)]
    return events + parser.finish(), parser


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_one_character_at_a_time_matches_parse(text: str) -> None:
    events, parser = _stream(list(text))
    assert _collect(events, parser) == parse(text)


@pytest.mark.parametrize("seed", range(20))
def test_stream_random_chunks_match_parse(seed: int) -> None:
    rng = random.Random(seed)
    for text in STREAM_TEXTS:
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
        pieces = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        events, parser = _stream(pieces)
        assert _collect(events, parser) == parse(text), pieces


def test_stream_holds_back_possible_markers_and_emits_calls_when_they_close() -> None:
    parser = StreamParser()
    assert parser.feed("Hello <") == [ChatDelta("content", "Hello ")]
    assert parser.feed("|chan") == []
    assert parser.feed("nel>thou") == []
    assert parser.thinking_started
    assert parser.feed("ght\nhmm") == [ChatDelta("thinking", "hmm")]
    assert parser.feed("<channel|><|tool_call>call:f{x:") == []
    assert parser.feed(f"{Q}1{Q}}}<tool_call") == []
    assert parser.feed("|>") == [ChatDelta("tool_call", tool_call=ToolCall("f", {"x": "1"}))]
    assert parser.feed(" a <b") == [ChatDelta("content", " a <b")]
    assert parser.feed(" <tu") == [ChatDelta("content", " ")]
    assert parser.feed("rn|>more") == []
    assert parser.finish() == []
