"""Structured outputs: constraining sampling to a grammar (JSON schema, JSON object, regex, choice, Lark grammar).

A request carries `SamplingParams(structured=StructuredOutputParams(...))` with exactly one of:

- `json_schema`: JSON Schema text. Honoured: types, nested objects, `properties` / `required`,
  `additionalProperties` (false forbids other keys; OpenAI's strict mode must say so in the schema), arrays
  with `items` / `minItems` / `maxItems`, `enum` / `const`, integer and number `minimum` / `maximum`,
  strings with `minLength` / `maxLength` / `pattern` (unanchored, as JSON Schema says: `^...$` bounds it) /
  some `format`s, `anyOf` / `oneOf`, `$ref` / `$defs`. Keywords it cannot enforce (`uniqueItems`, `not`,
  unknown `format`s) are an error, not ignored. JSON is written compactly (no whitespace between tokens); a
  schema's `"x-guidance"` object overrides llguidance's JSON options (e.g. `{"whitespace_flexible": true}`).
- `json_object=True`: any JSON object.
- `regex`: the whole answer matches it (Rust `regex` syntax).
- `choice`: the answer is exactly one of the strings.
- `grammar`: a Lark grammar in llguidance's dialect (https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md);
  the rule `start` is the whole answer. Quoted strings are text (`"call:"`); a special token is written
  unquoted, by its text (`<|tool_call>`, `<|"|>`, `<tool_call|>`) or by id (`<[48]>`): a quoted `"<|tool_call>"`
  would be its characters, which the special token never matches. Lexemes are `/regex/` terminals (upper-case
  names, e.g. `NAME: /[a-z_]+/`); a rule (lower-case name) may embed a JSON schema, `args: %json{...}`, whose
  whitespace is flexible unless the schema says `"x-guidance": {"whitespace_flexible": false}` (say it: a
  random or weak model can spin in whitespace). Tested example (tests/test_structured_output.py):

      start: <|tool_call> "call:" NAME "{" "location:" <|"|> /[a-z]{1,6}/ <|"|> "," "args:" args "}" <tool_call|>
      NAME: /get_[a-z]{1,5}/
      args: %json{"x-guidance": {"whitespace_flexible": false}, "type": "array", "items": {"type": "integer"}}

  The output text keeps the special tokens the grammar wrote (`<|tool_call>call:get_ab{...}<tool_call|>`).

`thinking=True`: an optional thought block at the start (`<|channel>` ... `<channel|>`) is free; the constraint
applies after it (see `state`). When the grammar is complete only the stop (EOS) tokens are allowed, so the
request ends there; `min_tokens` does not apply to structured requests (the grammar decides when they may stop).

Errors: `GrammarCompiler.validate` (called by `LLMEngine.check_request`, so a bad request fails before it is
queued) raises ValueError starting with "structured", then the constraint's name and what is wrong, on one line:
"structured json_schema: Unimplemented keys: ...", "structured regex: ... unclosed group ...".

Pieces: `compiler` (validation and an LRU cache of compiled grammars, over the tokenizer's vocabulary),
`state` (per-request matchers on rank 0's worker and each step's masks, filled on a thread during the forward),
`bitmask` (host bitmasks, applied to the logits with plain torch ops). Library: llguidance.
Import from the modules: this package is imported by `sampling_params` (for `params`), so it imports nothing.
"""

