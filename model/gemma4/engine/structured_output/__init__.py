"""Structured outputs: constraining sampling to a grammar (JSON schema, JSON object, regex, choice, Lark grammar).

A request carries `SamplingParams(structured=StructuredOutputParams(...))` with exactly one of:

- `json_schema`: JSON Schema text. Honoured: types, nested objects, `properties` / `required`,
  `additionalProperties` (false forbids other keys; OpenAI's strict mode must say so in the schema), arrays
  with `items` / `minItems` / `maxItems`, `enum` / `const`, integer and number `minimum` / `maximum`,
  strings with `minLength` / `maxLength` / `pattern` / some `format`s, `anyOf` / `oneOf`, `$ref` / `$defs`.
  Unsupported keywords are an error, not ignored. JSON is written compactly (no whitespace between tokens);
  a schema's `"x-guidance"` object overrides llguidance's JSON options (e.g. `{"whitespace_flexible": true}`).
- `json_object=True`: any JSON object.
- `regex`: the whole answer matches it (Rust `regex` syntax).
- `choice`: the answer is exactly one of the strings.
- `grammar`: a Lark grammar in llguidance's dialect (https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md);
  the rule `start` is the whole answer. Quoted strings are text (`"call:"`); a special token is written
  unquoted, by its text (`<|tool_call>`, `<|"|>`, `<tool_call|>`) or by id (`<[48]>`): a quoted `"<|tool_call>"`
  would be its characters, which the special token never matches. Rules may embed a JSON schema:
  `args: %json{"type": "object", "properties": {...}}`; lexemes are `/regex/` (e.g. `NAME: /[a-z_]+/`).
  Example, one Gemma 4 tool call: `start: <|tool_call> "call:get_weather" %json{...} <tool_call|>`.

`thinking=True`: an optional thought block at the start (`<|channel>` ... `<channel|>`) is free; the constraint
applies after it (see `state`). When the grammar is complete only the stop (EOS) tokens are allowed, so the
request ends there.

Pieces: `compiler` (validation and an LRU cache of compiled grammars, over the tokenizer's vocabulary),
`state` (per-request matchers on rank 0's worker and each step's masks, filled on a thread during the forward),
`bitmask` (host bitmasks, applied to the logits with plain torch ops). Library: llguidance.
Import from the modules: this package is imported by `sampling_params` (for `params`), so it imports nothing.
"""

