"""Chat rendering: golden prompts that the official templates and the built-in renderer must both produce."""

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from transformers.utils import chat_template_utils

from gemma4.chat import normalize_messages, render

DATA = Path(__file__).parent / "data"
LARGE_TEMPLATE = (DATA / "gemma4-large-interleaved.jinja").read_text(encoding="utf-8")
SMALL_TEMPLATE = (DATA / "gemma4-small-original.jinja").read_text(encoding="utf-8")
LARGE_VARIANTS = ("31b", "26B-A4B")
SMALL_VARIANTS = ("e2b", "E4B")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "nullable": True},
                "days": {"type": "integer", "description": "Forecast days", "nullable": True},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search documents",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "Query text"},
                "filters": {
                    "type": "object",
                    "description": "Filters",
                    "properties": {"Year": {"type": "integer", "nullable": True}, "author": {"type": "string"}},
                    "required": ["Year"],
                },
                "options": {"type": "object", "properties": {"fast": {"type": "boolean"}}},
                "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
                "ranges": {
                    "type": "array",
                    "description": "Ranges",
                    "items": {
                        "type": "object",
                        "properties": {"lo": {"type": "number"}, "hi": {"type": "number"}},
                        "required": ["lo"],
                    },
                },
            },
            "required": ["query"],
        },
        "response": {"type": "object", "description": "Matching documents"},
    },
}
# Expected declarations, verbatim. Note the template's quirks kept on purpose: keys sorted case-insensitively
# (author before Year), "{,properties:" / "{,items:" when an object/array property has no description, and
# no comma before "type" in that case.
WEATHER_DECL = (
    '<|tool>declaration:get_weather{description:<|"|>Get the current weather<|"|>,parameters:{properties:{'
    'city:{description:<|"|>City name<|"|>,type:<|"|>STRING<|"|>},'
    'days:{description:<|"|>Forecast days<|"|>,nullable:true,type:<|"|>INTEGER<|"|>},'
    'unit:{nullable:true,enum:[<|"|>celsius<|"|>,<|"|>fahrenheit<|"|>],type:<|"|>STRING<|"|>}},'
    'required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>'
)
SEARCH_DECL = (
    '<|tool>declaration:search{description:<|"|>Search documents<|"|>,parameters:{properties:{'
    'filters:{description:<|"|>Filters<|"|>,properties:{author:{type:<|"|>STRING<|"|>},'
    'Year:{nullable:true,type:<|"|>INTEGER<|"|>}},required:[<|"|>Year<|"|>],type:<|"|>OBJECT<|"|>},'
    'options:{,properties:{fast:{type:<|"|>BOOLEAN<|"|>}}type:<|"|>OBJECT<|"|>},'
    'query:{description:<|"|>Query text<|"|>,type:<|"|>STRING<|"|>},'
    'ranges:{description:<|"|>Ranges<|"|>,items:{properties:{hi:{type:<|"|>NUMBER<|"|>},lo:{type:<|"|>NUMBER<|"|>}},'
    'required:[<|"|>lo<|"|>],type:<|"|>OBJECT<|"|>},type:<|"|>ARRAY<|"|>},'
    'tags:{,items:{enum:[<|"|>a<|"|>,<|"|>b<|"|>],type:<|"|>STRING<|"|>}type:<|"|>ARRAY<|"|>}},'
    'required:[<|"|>query<|"|>],type:<|"|>OBJECT<|"|>},'
    'response:{description:<|"|>Matching documents<|"|>,type:<|"|>OBJECT<|"|>}}<tool|>'
)
EMPTY_THOUGHT = "<|channel>thought\n<channel|>"


@dataclass(frozen=True)
class Golden:
    name: str
    messages: list[dict[str, Any]]
    large: str
    small: str
    tools: list[dict[str, Any]] | None = None
    thinking: bool = False
    add_generation_prompt: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


GOLDENS = [
    Golden(
        "plain",
        [{"role": "user", "content": "  Hello there!  "}],
        large="<bos><|turn>user\nHello there!<turn|>\n<|turn>model\n<|channel>thought\n<channel|>",
        small="<bos><|turn>user\nHello there!<turn|>\n<|turn>model\n",
    ),
    Golden(
        "thinking",
        [{"role": "user", "content": "Why is the sky blue?"}],
        thinking=True,
        large="<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nWhy is the sky blue?<turn|>\n<|turn>model\n",
        small="<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nWhy is the sky blue?<turn|>\n<|turn>model\n",
    ),
    Golden(
        "system",
        [{"role": "system", "content": " You are terse. "}, {"role": "user", "content": "Hi"}],
        large="<bos><|turn>system\nYou are terse.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n" + EMPTY_THOUGHT,
        small="<bos><|turn>system\nYou are terse.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n",
    ),
    Golden(
        "developer_with_thinking",
        [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
        thinking=True,
        large="<bos><|turn>system\n<|think|>\nAnswer in French.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n",
        small="<bos><|turn>system\n<|think|>Answer in French.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n",
    ),
    Golden(
        "tool_declarations",
        [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Find papers"}],
        tools=[WEATHER_TOOL, SEARCH_TOOL],
        large=f"<bos><|turn>system\nUse tools.{WEATHER_DECL}{SEARCH_DECL}<turn|>\n<|turn>user\nFind papers<turn|>\n"
        "<|turn>model\n" + EMPTY_THOUGHT,
        small=f"<bos><|turn>system\nUse tools.{WEATHER_DECL}{SEARCH_DECL}<turn|>\n<|turn>user\nFind papers<turn|>\n"
        "<|turn>model\n",
    ),
    Golden(
        "awaiting_model_after_tool_response",
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"unit": "celsius", "city": "Paris", "days": 3}}}
                ],
                "tool_responses": [{"name": "get_weather", "response": {"temp": 21.5, "sky": "clear", "rain": False}}],
            },
        ],
        tools=[WEATHER_TOOL],
        large=f"<bos><|turn>system\n{WEATHER_DECL}<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3,unit:<|"|>celsius<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{rain:false,sky:<|"|>clear<|"|>,temp:21.5}<tool_response|>'
        + EMPTY_THOUGHT,
        small=f"<bos><|turn>system\n{WEATHER_DECL}<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3,unit:<|"|>celsius<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{rain:false,sky:<|"|>clear<|"|>,temp:21.5}<tool_response|>',
    ),
    Golden(
        "tool_round_trip",
        [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"function": {"name": "get_weather", "arguments": 'city:<|"|>Rome<|"|>'}},
                ],
                "tool_responses": [
                    {"name": "get_weather", "response": {"forecast": ["sun", "rain"], "note": None}},
                    {"name": "get_weather", "response": 18},
                ],
                "content": "Paris: sun, then rain. Rome: 18 degrees.",
            },
            {"role": "user", "content": "Thanks!"},
        ],
        tools=[WEATHER_TOOL],
        large=f"<bos><|turn>system\n{WEATHER_DECL}<turn|>\n<|turn>user\nWeather in Paris and Rome?<turn|>\n"
        '<|turn>model\n<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
        '<|tool_call>call:get_weather{city:<|"|>Rome<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{forecast:[<|"|>sun<|"|>,<|"|>rain<|"|>],note:None}<tool_response|>'
        "<|tool_response>response:get_weather{value:18}<tool_response|>"
        "Paris: sun, then rain. Rome: 18 degrees.<turn|>\n<|turn>user\nThanks!<turn|>\n<|turn>model\n" + EMPTY_THOUGHT,
        small=f"<bos><|turn>system\n{WEATHER_DECL}<turn|>\n<|turn>user\nWeather in Paris and Rome?<turn|>\n"
        '<|turn>model\n<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
        '<|tool_call>call:get_weather{city:<|"|>Rome<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{forecast:[<|"|>sun<|"|>,<|"|>rain<|"|>],note:None}<tool_response|>'
        "<|tool_response>response:get_weather{value:18}<tool_response|>"
        "Paris: sun, then rain. Rome: 18 degrees.<turn|>\n<|turn>user\nThanks!<turn|>\n<|turn>model\n",
    ),
    Golden(
        "earlier_thinking_stripped",
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<|channel>thought\nEasy: 4.<channel|>It is 4."},
            {"role": "user", "content": "And 3+3?"},
        ],
        thinking=True,
        large="<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n"
        "<|turn>model\nIt is 4.<turn|>\n<|turn>user\nAnd 3+3?<turn|>\n<|turn>model\n",
        small="<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\nIt is 4.<turn|>\n"
        "<|turn>user\nAnd 3+3?<turn|>\n<|turn>model\n",
    ),
    Golden(
        "reasoning_replayed_before_tool_calls",
        [
            {"role": "user", "content": "Plan my trip"},
            {
                "role": "assistant",
                "reasoning_content": "I need the weather first.",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
                "tool_responses": [{"name": "get_weather", "response": "snow"}],
            },
            {
                "role": "assistant",
                "reasoning_content": "Now search.",
                "tool_calls": [
                    {
                        "function": {
                            "name": "search",
                            "arguments": {"query": "Oslo in winter", "filters": {"Year": 2024}},
                        }
                    }
                ],
            },
        ],
        tools=[WEATHER_TOOL, SEARCH_TOOL],
        thinking=True,
        large=f"<bos><|turn>system\n<|think|>\n{WEATHER_DECL}{SEARCH_DECL}<turn|>\n<|turn>user\nPlan my trip<turn|>\n"
        "<|turn>model\n<|channel>thought\nI need the weather first.<channel|>"
        '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>snow<|"|>}<tool_response|>'
        "<|channel>thought\nNow search.<channel|>"
        '<|tool_call>call:search{filters:{Year:2024},query:<|"|>Oslo in winter<|"|>}<tool_call|><turn|>\n'
        "<|turn>model\n",
        small=f"<bos><|turn>system\n<|think|>{WEATHER_DECL}{SEARCH_DECL}<turn|>\n<|turn>user\nPlan my trip<turn|>\n"
        '<|turn>model\n<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>snow<|"|>}<tool_response|>'
        '<|turn>model\n<|tool_call>call:search{filters:{Year:2024},query:<|"|>Oslo in winter<|"|>}<tool_call|><turn|>\n'
        "<|turn>model\n",
    ),
    Golden(
        "multimodal",
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": " Describe these. "},
                    {"type": "image"},
                    {"type": "audio"},
                    {"type": "video"},
                    {"type": "text", "text": "Briefly."},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": " A cat, a bark, a dance. "}]},
            {"role": "user", "content": [{"type": "image"}]},
        ],
        large="<bos><|turn>user\nDescribe these.\n\n<|image|>\n\n<|audio|>\n\n<|video|>\n\nBriefly.<turn|>\n"
        "<|turn>model\nA cat, a bark, a dance.<turn|>\n<|turn>user\n\n\n<|image|>\n\n<turn|>\n<|turn>model\n"
        + EMPTY_THOUGHT,
        small="<bos><|turn>user\nDescribe these.\n\n<|image|>\n\n<|audio|>\n\n<|video|>\n\nBriefly.<turn|>\n"
        "<|turn>model\nA cat, a bark, a dance.<turn|>\n<|turn>user\n\n\n<|image|>\n\n<turn|>\n<|turn>model\n",
    ),
    Golden(
        "no_generation_prompt",
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        add_generation_prompt=False,
        large="<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n",
        small="<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n",
    ),
]


def _render(golden: Golden, variant: str, *, use_template: bool) -> str:
    template = LARGE_TEMPLATE if variant in LARGE_VARIANTS else SMALL_TEMPLATE
    return render(
        golden.messages,
        tools=golden.tools,
        thinking=golden.thinking,
        variant=variant,
        add_generation_prompt=golden.add_generation_prompt,
        template=template if use_template else None,
    )


@pytest.mark.parametrize("use_template", [True, False], ids=["template", "builtin"])
@pytest.mark.parametrize("variant", LARGE_VARIANTS + SMALL_VARIANTS)
@pytest.mark.parametrize("golden", GOLDENS, ids=lambda golden: golden.name)
def test_golden_prompt(golden: Golden, variant: str, use_template: bool) -> None:
    expected = golden.large if variant in LARGE_VARIANTS else golden.small
    assert _render(golden, variant, use_template=use_template) == expected


@pytest.mark.parametrize("template", [LARGE_TEMPLATE, SMALL_TEMPLATE], ids=["large", "small"])
@pytest.mark.parametrize("golden", GOLDENS, ids=lambda golden: golden.name)
def test_template_path_matches_transformers(golden: Golden, template: str) -> None:
    rendered, _ = chat_template_utils.render_jinja_template(
        [normalize_messages(golden.messages)],
        tools=golden.tools,
        chat_template=template,
        add_generation_prompt=golden.add_generation_prompt,
        enable_thinking=golden.thinking,
        bos_token="<bos>",
    )
    variant = "31b" if template is LARGE_TEMPLATE else "e2b"
    assert rendered[0] == _render(golden, variant, use_template=True)


# OpenAI-style input and the native shape it must be mapped onto.
OPENAI_CHAT = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "reasoning": "Two cities, two calls.",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_2", "content": "18 degrees"},
    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
    {"role": "assistant", "content": "Rome: 18 degrees. Paris: sunny."},
    {"role": "user", "content": "Thanks!"},
]
NATIVE_CHAT = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "reasoning_content": "Two cities, two calls.",
        "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
        ],
        "tool_responses": [
            {"name": "get_weather", "response": "18 degrees"},
            {"name": "get_weather", "response": "sunny"},
        ],
        "content": "Rome: 18 degrees. Paris: sunny.",
    },
    {"role": "user", "content": "Thanks!"},
]


@pytest.mark.parametrize("use_template", [True, False], ids=["template", "builtin"])
@pytest.mark.parametrize("variant", ["31b", "e2b"])
def test_openai_tool_messages_render_like_native_tool_responses(variant: str, use_template: bool) -> None:
    template = (LARGE_TEMPLATE if variant == "31b" else SMALL_TEMPLATE) if use_template else None
    openai = render(OPENAI_CHAT, tools=[WEATHER_TOOL], variant=variant, template=template)
    assert openai == render(NATIVE_CHAT, tools=[WEATHER_TOOL], variant=variant, template=template)
    assert openai.endswith(
        '<|turn>model\n<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
        '<|tool_call>call:get_weather{city:<|"|>Rome<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>18 degrees<|"|>}<tool_response|>'
        '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>'
        "Rome: 18 degrees. Paris: sunny.<turn|>\n<|turn>user\nThanks!<turn|>\n<|turn>model\n"
        + (EMPTY_THOUGHT if variant == "31b" else "")
    )


def test_openai_pending_tool_result_leaves_model_turn_open() -> None:
    messages = OPENAI_CHAT[:4]
    prompt = render(messages, tools=[WEATHER_TOOL], variant="31b", thinking=True)
    # Reasoning after the last user turn is replayed; the model continues right after the responses.
    assert prompt.endswith(
        "<|turn>model\n<|channel>thought\nTwo cities, two calls.<channel|>"
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
        '<|tool_call>call:get_weather{city:<|"|>Rome<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>18 degrees<|"|>}<tool_response|>'
        '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>'
    )


def test_tool_name_falls_back_to_message_name_and_structured_content_is_kept() -> None:
    messages = [
        {"role": "user", "content": "Look it up"},
        {"role": "model", "tool_calls": [{"function": {"name": "lookup", "arguments": ""}}]},
        {"role": "tool", "name": "lookup", "content": {"hits": 2, "top": "x"}},
    ]
    assert render(messages, variant="e4b").endswith(
        '<|turn>model\n<|tool_call>call:lookup{}<tool_call|><|tool_response>response:lookup{hits:2,top:<|"|>x<|"|>}'
        "<tool_response|>"
    )


def test_normalization_leaves_caller_messages_untouched() -> None:
    original = copy.deepcopy(OPENAI_CHAT)
    render(OPENAI_CHAT, variant="31b")
    normalize_messages(OPENAI_CHAT)
    assert original == OPENAI_CHAT


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "non-empty"),
        ([{"role": "robot", "content": "hi"}], r"messages\[0\].role"),
        ([{"role": "user", "content": "hi"}, {"role": "user"}], r"messages\[1\].content"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "gif"}]}],
            r"messages\[0\].content\[1\].type",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], r"messages\[0\].content\[0\].text"),
        ([{"role": "user", "content": 42}], r"messages\[0\].content"),
        (
            [{"role": "user", "content": "x"}, {"role": "tool", "content": "y", "name": "f"}],
            r"messages\[1\]: a tool message",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": {}}}]},
                {"role": "tool", "tool_call_id": "b", "content": "y"},
            ],
            r"messages\[2\].tool_call_id",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}],
            r"messages\[0\].tool_calls\[0\].function.arguments",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}],
            r"messages\[0\].tool_calls\[0\].function.name",
        ),
        (
            [{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "x"}],
            r"messages\[0\].content: a system message",
        ),
    ],
)
def test_invalid_messages_name_index_and_field(messages: list[dict[str, Any]], error: str) -> None:
    for template in (None, LARGE_TEMPLATE):
        with pytest.raises(ValueError, match=error):
            render(messages, template=template)


def test_invalid_tools_and_variant_are_rejected() -> None:
    chat = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"tools\[0\].function"):
        render(chat, tools=[{"name": "f"}])
    with pytest.raises(ValueError, match="unknown Gemma 4 variant"):
        render(chat, variant="7b")


def test_system_text_parts_join_into_one_string() -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": " Be brief. "}, {"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": "Hi"},
    ]
    for template in (None, SMALL_TEMPLATE):
        assert render(messages, variant="e2b", template=template).startswith(
            "<bos><|turn>system\nBe brief. Be kind.<turn|>\n"
        )


def test_template_errors_become_value_errors() -> None:
    chat = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="syntax error"):
        render(chat, template="{% if %}")
    with pytest.raises(ValueError, match="no system prompts here"):
        render(chat, template="{{ raise_exception('no system prompts here') }}")
    with pytest.raises(ValueError, match="failed to render"):
        render(chat, template="{{ messages[0].__class__.__mro__ }}{{ ().__class__.__base__.__subclasses__() }}")


def test_template_whitespace_control_matches_transformers() -> None:
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before one.
    template = "{% if true %}\n  {% if true %}{{ bos_token }}{% endif %}\n{% endif %}"
    assert render([{"role": "user", "content": "hi"}], template=template) == "<bos>"


def test_template_sees_transformers_globals() -> None:
    template = (
        "{{ bos_token }}{{ messages | tojson }}|{{ tools | tojson }}|{{ add_generation_prompt }}|{{ enable_thinking }}"
    )
    rendered = render([{"role": "user", "content": "é"}], template=template, thinking=True)
    assert rendered == '<bos>[{"role": "user", "content": "é"}]|null|True|True'
