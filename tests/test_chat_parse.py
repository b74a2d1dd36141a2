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
        ("a < b and c <| d <turn|>", None, "a < b and c <| d "),
        ("<|channel>thought\nhmm<eos>", "hmm", ""),
    ],
)
def test_thinking_and_content_edge_cases(text: str, thinking: str | None, content: str) -> None:
    parsed = parse(text)
    assert (parsed.thinking, parsed.content, parsed.tool_calls, parsed.errors) == (thinking, content, [], [])


def test_stop_marker_followed_by_more_text_is_kept_and_parsing_goes_on() -> None:
    # The engine cuts generation at its stop tokens, so one inside the text did not stop it (ignore_eos, or
    # the request's own stop_token_ids): it is text, reported, and what follows is parsed as usual.
    parsed = parse("Answer.<turn|>More <|tool_call>call:f{a:1}<tool_call|> end<eos>tail<eos>")
    assert parsed.content == "Answer.<turn|>More  end<eos>tail"  # the final <eos> ends the text: dropped
    assert parsed.tool_calls == [ToolCall("f", {"a": 1})]
    assert len(parsed.errors) == 2 and "<turn|>" in parsed.errors[0] and "<eos>" in parsed.errors[1]
    inside_thought = parse("<|channel>thought\nhmm<eos>still<channel|>Answer")
    assert (inside_thought.thinking, inside_thought.content) == ("hmm<eos>still", "Answer")
    assert len(inside_thought.errors) == 1 and "<eos>" in inside_thought.errors[0]
    inside_call = parse("<|tool_call>call:f{a:1<|tool_response>rest")
    assert inside_call.content == "<|tool_call>call:f{a:1<|tool_response>rest" and inside_call.tool_calls == []
    assert [("cut off by <|tool_response>" in e, "<|tool_response> inside" in e) for e in inside_call.errors] == [
        (True, False),
        (False, True),
    ]


def test_stray_closing_markers_are_kept_as_text() -> None:
    text = "stray <channel|>closer and <tool_call|> kept"
    parsed = parse(text)
    assert (parsed.thinking, parsed.content, parsed.tool_calls) == (None, text, [])
    assert len(parsed.errors) == 2 and all(e.startswith("stray ") for e in parsed.errors)


def test_overlong_open_tool_call_is_abandoned_into_text_and_parsing_goes_on() -> None:
    parser = StreamParser(max_tool_call_chars=20)
    body = "call:f{a:" + "x" * 15  # 24 characters: over the bound, never closed
    events = parser.feed(f"Hi <|tool_call>{body}")
    # Not held until the stream ends: the call's first 20 characters come back as text at once.
    assert events[:2] == [ChatDelta("content", "Hi "), ChatDelta("content", f"<|tool_call>{body[:20]}")]
    assert events[2].kind == "error" and "longer than 20 characters" in events[2].text
    assert events[3:] == [ChatDelta("content", body[20:])]
    assert parser.feed(" <|tool_call>call:g{}<tool_call|> bye") == [
        ChatDelta("content", " "),
        ChatDelta("tool_call", tool_call=ToolCall("g", {})),
        ChatDelta("content", " bye"),
    ]
    assert parser.finish() == []
    parsed = parse(f"<|tool_call>call:f{{a:{Q}{'y' * 30}{Q}}}<tool_call|>", max_tool_call_chars=20)
    assert parsed.tool_calls == [] and parsed.content.startswith("<|tool_call>call:f{a:")
    exact = f"call:f{{a:{Q}{'y' * 8}{Q}}}"  # a call exactly at the bound still parses
    assert parse(f"<|tool_call>{exact}<tool_call|>", max_tool_call_chars=len(exact)).tool_calls == [
        ToolCall("f", {"a": "y" * 8})
    ]
    with pytest.raises(ValueError, match="max_tool_call_chars must be a positive integer"):
        StreamParser(max_tool_call_chars=0)


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
    assert cut.content == "<|tool_call>call:f{a:1" and len(cut.errors) == 1 and "cut off by <turn|>" in cut.errors[0]


@pytest.mark.parametrize("variant", ["31b", "e2b"])
def test_rendered_tool_calls_parse_back(variant: str) -> None:
    calls = [("search", TRICKY_ARGUMENTS), ("get_weather", {"city": "Paris", "days": 3})]
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [{"function": {"name": n, "arguments": a}} for n, a in calls]},
    ]
    prompt = render(messages, variant=variant, add_generation_prompt=False)
    generated = prompt.rsplit("<|turn>model\n", 1)[1]
    assert generated.endswith("<turn|>\n")
    generated = generated.removesuffix("\n")  # the template's newline after the turn; the model stops at <turn|>
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
    "a < b <turn|>not ignored <|channel>after stop<eos><turn|>",
    "<|channel>thought\nhmm<eos>still<channel|><|tool_call>call:f{a:1<|tool_response>rest<tool_call|>",
    f"<|tool_call>call:f{{a:{Q}{'y' * 30}{Q}}}<tool_call|> and <|tool_call>call:g{{}}<tool_call|><turn|>",
    "<|tool_call>call:f{a:" + "<tool_call" * 5 + "<turn|",
]


def _collect(events: list[ChatDelta], parser: StreamParser) -> ParsedOutput:
    return ParsedOutput(
        thinking="".join(e.text for e in events if e.kind == "thinking") if parser.thinking_started else None,
        content="".join(e.text for e in events if e.kind == "content"),
        tool_calls=[e.tool_call for e in events if e.kind == "tool_call"],
        errors=[e.text for e in events if e.kind == "error"],
    )


def _stream(pieces: list[str], max_tool_call_chars: int) -> tuple[list[ChatDelta], StreamParser]:
    parser = StreamParser(max_tool_call_chars)
    events = [event for piece in pieces for event in parser.feed(piece)]
    return events + parser.finish(), parser


BOUNDS = [8192, 12]  # the default, and one that abandons most calls above


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_one_character_at_a_time_matches_parse(text: str, bound: int) -> None:
    events, parser = _stream(list(text), bound)
    assert _collect(events, parser) == parse(text, max_tool_call_chars=bound)


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("seed", range(20))
def test_stream_random_chunks_match_parse(seed: int, bound: int) -> None:
    rng = random.Random(seed)
    for text in STREAM_TEXTS:
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
        pieces = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        events, parser = _stream(pieces, bound)
        assert _collect(events, parser) == parse(text, max_tool_call_chars=bound), pieces


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
    assert parser.feed("rn|>") == []  # the end of the generation, or text if more follows
    more = parser.feed("more")
    assert [(e.kind, e.text) for e in more if e.kind != "error"] == [("content", "<turn|>"), ("content", "more")]
    assert [e.kind for e in more] == ["content", "error", "content"]
    assert parser.feed("<eos>") == []
    assert parser.finish() == []  # a stop marker ending the text is the generation's end
