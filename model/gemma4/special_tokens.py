"""Gemma 4 special tokens: the control strings of the chat format and their ids in the released vocabulary.

The ids are those of the 262 144-entry checkpoint vocabulary. Code that needs an id must still ask its
tokenizer (``Gemma4Tokenizer.token_to_id``): a small test vocabulary cannot hold ids above its size and
places the multimodal tokens elsewhere. The chat renderer and parser only need the strings.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecialToken:
    """One control token: its text and its id in the released Gemma 4 vocabulary."""

    text: str
    id: int


PAD = SpecialToken("<pad>", 0)
EOS = SpecialToken("<eos>", 1)
BOS = SpecialToken("<bos>", 2)
UNK = SpecialToken("<unk>", 3)
MASK = SpecialToken("<mask>", 4)
TOOL_START = SpecialToken("<|tool>", 46)
TOOL_END = SpecialToken("<tool|>", 47)
TOOL_CALL_START = SpecialToken("<|tool_call>", 48)
TOOL_CALL_END = SpecialToken("<tool_call|>", 49)
TOOL_RESPONSE_START = SpecialToken("<|tool_response>", 50)
TOOL_RESPONSE_END = SpecialToken("<tool_response|>", 51)
STRING_DELIMITER = SpecialToken('<|"|>', 52)
THINK = SpecialToken("<|think|>", 98)
CHANNEL_START = SpecialToken("<|channel>", 100)
CHANNEL_END = SpecialToken("<channel|>", 101)
TURN_START = SpecialToken("<|turn>", 105)
TURN_END = SpecialToken("<turn|>", 106)
IMAGE_START = SpecialToken("<|image>", 255999)
AUDIO_START = SpecialToken("<|audio>", 256000)
IMAGE = SpecialToken("<|image|>", 258880)
AUDIO = SpecialToken("<|audio|>", 258881)
IMAGE_END = SpecialToken("<image|>", 258882)
AUDIO_END = SpecialToken("<audio|>", 258883)
VIDEO = SpecialToken("<|video|>", 258884)

ALL_SPECIAL_TOKENS: tuple[SpecialToken, ...] = (
    PAD, EOS, BOS, UNK, MASK,
    TOOL_START, TOOL_END, TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END,
    STRING_DELIMITER, THINK, CHANNEL_START, CHANNEL_END, TURN_START, TURN_END,
    IMAGE_START, AUDIO_START, IMAGE, AUDIO, IMAGE_END, AUDIO_END, VIDEO,
)

# "\n" is an ordinary token, but the chat format leans on it after every turn marker.
NEWLINE_ID = 107

# Generation stops on these (generation_config.json of the instruction-tuned checkpoints: [1, 106, 50]).
DEFAULT_STOP_TOKENS: tuple[SpecialToken, ...] = (EOS, TURN_END, TOOL_RESPONSE_START)
