"""The tool-call grammar against the chat format's own formatter and parser.

Random argument values matching each schema, written by `format_tool_arguments`, are accepted by the
grammar (llguidance's matcher over the tiny tokenizer); invalid ones are not; and random walks through
the grammar's token masks always give calls that `gemma4.chat.parse` reads and that match the schema.
"""

from __future__ import annotations

import random
import string
from typing import Any

import jsonschema
import llguidance
import pytest

from gemma4.chat import parse
from gemma4.chat.syntax import format_tool_arguments
from gemma4.chat.tool_grammar import ToolSchemaError, tool_call_grammar
from gemma4.tiny_tokenizer import build_tiny_tokenizer
from json_schemas import SCHEMAS

# Characters a string value may hold, the call syntax's own delimiters among them.
_ALPHABET = string.ascii_letters + string.digits + " :,{}[]\"'\n<|>é€😀"


@pytest.fixture(scope="module")
def vocab() -> tuple[Any, llguidance.LLTokenizer]:
    tokenizer = build_tiny_tokenizer(512)
    stops = [tokenizer.token_to_id(t) for t in ("<eos>", "<turn|>", "<|tool_response>")]
    return tokenizer, llguidance.LLTokenizer(tokenizer.to_str(), eos_token=stops)


def tool(name: str, parameters: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters, **extra}}


def matcher(vocab: Any, grammar: str) -> llguidance.LLMatcher:
    result = llguidance.LLMatcher(vocab[1], llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not result.is_error(), result.get_error()
    return result


def accepts(vocab: Any, grammar: str, text: str) -> bool:
    m = matcher(vocab, grammar)
    return m.consume_tokens(vocab[0].encode(text, add_special_tokens=False).ids) and m.is_accepting()


def random_value(schema: Any, rng: random.Random) -> Any:
    """A value matching one of the test schemas (the subset of JSON Schema they use)."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "anyOf" in schema:
        return random_value(rng.choice(schema["anyOf"]), rng)
    kind = schema["type"]
    kind = rng.choice(kind) if isinstance(kind, list) else kind
    if kind == "string":
        length = rng.randint(schema.get("minLength", 0), schema.get("maxLength", 8))
        return "".join(rng.choice(_ALPHABET) for _ in range(length))
    if kind == "integer":
        return rng.randint(schema.get("minimum", -1000), schema.get("maximum", 1000))
    if kind == "number":
        return round(rng.uniform(schema.get("minimum", -1000), schema.get("maximum", 1000)), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "array":
        count = rng.randint(schema.get("minItems", 0), schema.get("maxItems", 3))
        return [random_value(schema["items"], rng) for _ in range(count)]
    required = schema.get("required", [])
    return {
        key: random_value(value, rng)
        for key, value in schema["properties"].items()
        if key in required or rng.random() < 0.5
    }


def random_walk(vocab: Any, m: llguidance.LLMatcher, rng: random.Random, max_steps: int = 600) -> list[int]:
    """Tokens drawn uniformly from each step's allowed set until a stop token (or the grammar's end)."""
    tokens: list[int] = []
    stops = set(vocab[1].eos_tokens)
    for _ in range(max_steps):
        if m.is_stopped():
            return tokens
        mask = m.compute_bitmask()
        allowed = [i for i in range(vocab[1].vocab_size) if mask[i // 8] >> (i % 8) & 1]
        token = rng.choice(allowed)
        if token in stops:
            return tokens
        assert m.consume_token(token), m.get_error()
        tokens.append(token)
    raise AssertionError(f"no stop after {max_steps} tokens: {vocab[0].decode(tokens, skip_special_tokens=False)!r}")


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_formatted_random_values_are_accepted(vocab: Any, name: str) -> None:
    schema = SCHEMAS[name]
    grammar = tool_call_grammar([tool(name, schema)], name=name)
    rng = random.Random(name)
    for _ in range(25):
        arguments = random_value(schema, rng)
        jsonschema.validate(arguments, schema)
        text = f"<|tool_call>call:{name}{format_tool_arguments(arguments)}<tool_call|>"
        assert accepts(vocab, grammar, text), text


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_constrained_random_calls_parse_and_match(vocab: Any, name: str) -> None:
    schema = SCHEMAS[name]
    m = matcher(vocab, tool_call_grammar([tool(name, schema)], name=name))
    rng = random.Random(f"walk-{name}")
    for _ in range(5):
        m.reset()
        text = vocab[0].decode(random_walk(vocab, m, rng), skip_special_tokens=False)
        parsed = parse(text)
        assert not parsed.errors and parsed.content == "" and len(parsed.tool_calls) == 1, text
        assert parsed.tool_calls[0].name == name
        jsonschema.validate(parsed.tool_calls[0].arguments, schema)


def test_invalid_arguments_are_refused(vocab: Any) -> None:
    grammar = tool_call_grammar([tool("weather", SCHEMAS["weather"])], required=True)
    valid = '<|tool_call>call:weather{city:<|"|>Oslo<|"|>,unit:<|"|>celsius<|"|>}<tool_call|>'
    assert accepts(vocab, grammar, valid)
    for text in (
        '<|tool_call>call:weather{city:<|"|>Oslo<|"|>}<tool_call|>',  # missing required unit
        '<|tool_call>call:weather{unit:<|"|>celsius<|"|>,city:<|"|>Oslo<|"|>}<tool_call|>',  # key order
        '<|tool_call>call:weather{city:<|"|>Oslo<|"|>,days:8,unit:<|"|>celsius<|"|>}<tool_call|>',  # days > 7
        '<|tool_call>call:weather{city:<|"|>Oslo<|"|>,unit:<|"|>kelvin<|"|>}<tool_call|>',  # not in enum
        '<|tool_call>call:weather{city:<|"|><|"|>,unit:<|"|>celsius<|"|>}<tool_call|>',  # minLength 1
        '<|tool_call>call:other{city:<|"|>Oslo<|"|>,unit:<|"|>celsius<|"|>}<tool_call|>',  # unknown tool
        'Sure: <|tool_call>call:weather{city:<|"|>Oslo<|"|>,unit:<|"|>celsius<|"|>}<tool_call|>',  # text first
    ):
        assert not accepts(vocab, grammar, text), text


def test_required_picks_among_tools_and_parallel_calls(vocab: Any) -> None:
    tools = [tool("weather", SCHEMAS["weather"]), tool("point", SCHEMAS["point"])]
    one = '<|tool_call>call:point{x:1,y:-2.5}<tool_call|>'
    two = one + '<|tool_call>call:weather{city:<|"|>Rome<|"|>,unit:<|"|>fahrenheit<|"|>}<tool_call|>'
    assert accepts(vocab, tool_call_grammar(tools, required=True), two)
    assert accepts(vocab, tool_call_grammar(tools, required=True, parallel=False), one)
    assert not accepts(vocab, tool_call_grammar(tools, required=True, parallel=False), two)
    assert not accepts(vocab, tool_call_grammar(tools, name="weather"), one)


def test_auto_with_strict_tools_allows_text_and_constrains_strict_calls(vocab: Any) -> None:
    tools = [tool("weather", SCHEMAS["weather"], strict=True), tool("free", {"type": "object"})]
    grammar = tool_call_grammar(tools, strict_only=True)
    assert accepts(vocab, grammar, "Just text, no call.")
    assert accepts(vocab, grammar, 'Let me check. <|tool_call>call:free{anything:[1,<|"|>x<|"|>]}<tool_call|>')
    assert not accepts(vocab, grammar, 'Let me check. <|tool_call>call:weather{city:<|"|>Oslo<|"|>}<tool_call|>')
    m = matcher(vocab, grammar)
    prefix = vocab[0].encode("Checking.<|tool_call>call:weather", add_special_tokens=False).ids
    assert m.consume_tokens(prefix)
    text = vocab[0].decode(prefix + random_walk(vocab, m, random.Random(3)), skip_special_tokens=False)
    parsed = parse(text)
    assert parsed.content.startswith("Checking.") and len(parsed.tool_calls) == 1, text
    jsonschema.validate(parsed.tool_calls[0].arguments, SCHEMAS["weather"])


def test_optional_fields_and_tools_without_parameters(vocab: Any) -> None:
    optional = {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "integer"}}}
    tools = [tool("opt", optional), {"type": "function", "function": {"name": "bare"}}]
    grammar = tool_call_grammar(tools, required=True)
    for arguments in ("{}", "{a:true}", "{b:-3}", "{a:false,b:0}"):
        assert accepts(vocab, grammar, f"<|tool_call>call:opt{arguments}<tool_call|>"), arguments
    assert accepts(vocab, grammar, "<|tool_call>call:bare{}<tool_call|>")
    for text in ("<|tool_call>call:opt{b:1,a:true}<tool_call|>", "<|tool_call>call:opt{,b:1}<tool_call|>",
                 "<|tool_call>call:bare{a:true}<tool_call|>"):
        assert not accepts(vocab, grammar, text), text


@pytest.mark.parametrize(
    ("parameters", "where"),
    [
        ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^x"}}}, "parameters.properties.a.pattern"),
        ({"type": "object", "properties": {"a": {"type": "date"}}}, "parameters.properties.a.type"),
        ({"type": "object", "properties": {"a b ": {"type": "string"}}}, "parameters.properties.a b "),
        ({"type": "object", "properties": {"a": {"type": "integer", "minimum": "1"}}}, "parameters.properties.a.minimum"),
        ({"type": "object", "properties": {"a": {"type": "string", "maxLength": -1}}}, "parameters.properties.a.maxLength"),
        ({"type": "object", "properties": {}, "required": ["a"]}, "parameters.required"),
        ({"type": "array", "items": {}}, "parameters.type"),
        ({"type": "object", "properties": {"a": {"enum": ["<tool_call|>"]}}}, "parameters.properties.a.enum[0]"),
        ({"type": "object", "$ref": "#/$defs/x"}, "parameters.$ref"),
    ],
)
def test_unsupported_schemas_name_the_field(parameters: dict[str, Any], where: str) -> None:
    with pytest.raises(ToolSchemaError) as error:
        tool_call_grammar([tool("f", parameters)], required=True)
    assert error.value.where == f"tools[0].function.{where}", str(error.value)


def test_unknown_forced_tool_is_refused() -> None:
    with pytest.raises(ToolSchemaError) as error:
        tool_call_grammar([tool("f", {"type": "object"})], name="g")
    assert error.value.where == "tool_choice.function.name"
