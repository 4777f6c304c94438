"""A checkpoint's tokenizer, read without transformers and tested against it.

- `checkpoint`: the files a checkpoint ships (names, JSON, special-token resolution) -> the
  arguments of a Tokenizer;
- `chat_template`: transformers' Jinja sandbox and the rendering of a conversation;
- `tokenizer`: `Tokenizer` itself (encode, decode, batches, apply_chat_template, save).
"""

from fnlm.tokenizer.checkpoint import (
    ADDED_TOKENS_FILE,
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    CHAT_TEMPLATE_JSON_FILE,
    GENERATION_CONFIG_FILE,
    NAMED_SPECIAL_TOKENS,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
)
from fnlm.tokenizer.tokenizer import PAD_TOKEN_CANDIDATES, UNLIMITED_MODEL_MAX_LENGTH, Tokenizer

__all__ = [
    "ADDED_TOKENS_FILE",
    "CHAT_TEMPLATE_DIR",
    "CHAT_TEMPLATE_FILE",
    "CHAT_TEMPLATE_JSON_FILE",
    "GENERATION_CONFIG_FILE",
    "NAMED_SPECIAL_TOKENS",
    "PAD_TOKEN_CANDIDATES",
    "SPECIAL_TOKENS_MAP_FILE",
    "TOKENIZER_CONFIG_FILE",
    "TOKENIZER_FILE",
    "UNLIMITED_MODEL_MAX_LENGTH",
    "Tokenizer",
]
