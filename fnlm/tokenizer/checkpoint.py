"""The files of a checkpoint's tokenizer, read as transformers reads them.

`read(directory)` turns tokenizer.json, tokenizer_config.json, special_tokens_map.json,
added_tokens.json, chat_template.jinja / additional_chat_templates/*.jinja / chat_template.json and
generation_config.json into the arguments of `Tokenizer`: the `tokenizers` backend with the same
special tokens added as transformers' `TokenizersBackend` adds, the named and extra special tokens,
the chat template(s), generation's eos and pad ids. Every error names the file at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

from fnlm import files
from fnlm.errors import TokenizerError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# The named special tokens of transformers' PreTrainedTokenizerBase, in its order.
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def read(directory: Path) -> dict[str, Any]:
    """The keyword arguments of `Tokenizer` for a checkpoint directory (see `Tokenizer.from_dir`).

    Raises TokenizerError naming the file when a file is missing or malformed.
    """
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise TokenizerError(
            f"tokenizer directory {str(directory)!r} {what}; pass the checkpoint directory "
            f"that holds {TOKENIZER_FILE}"
        )
    backend, tokenizer_json = _read_backend(directory)
    init = _read_tokenizer_config(directory)
    special, extra, added_tokens_decoder = _special_tokens(directory, init, tokenizer_json, backend)
    _add_special_tokens_to_backend(backend, added_tokens_decoder, special, extra)
    backend.no_padding()
    backend.no_truncation()
    backend.encode_special_tokens = bool(init.get("split_special_tokens", False))
    if backend.post_processor is None:
        # transformers installs an identity template here; do the same so that a saved
        # tokenizer.json is byte-for-byte what transformers would write.
        backend.post_processor = processors.TemplateProcessing(
            single="$A:0", pair="$A:0 $B:1", special_tokens=[]
        )
    generation_eos, generation_pad = _read_generation_config(directory)

    chat_template = init.get("chat_template")
    if isinstance(chat_template, list):
        chat_template = {item["name"]: item["template"] for item in chat_template}
    if chat_template is not None and not isinstance(chat_template, (str, dict)):
        raise TokenizerError(
            f"{directory / TOKENIZER_CONFIG_FILE}: chat_template must be a string or a list of "
            f"{{'name', 'template'}} objects, got {type(chat_template).__name__}"
        )
    model_max_length = init.get("model_max_length", init.get("max_len"))
    return {
        "backend": backend,
        "special_tokens": special,
        "extra_special_tokens": extra,
        "chat_template": chat_template,
        "model_max_length": int(model_max_length) if model_max_length is not None else None,
        "generation_eos_token_ids": generation_eos,
        "generation_pad_token_id": generation_pad if isinstance(generation_pad, int) else None,
        "clean_up_tokenization_spaces": init.get("clean_up_tokenization_spaces", False),
        "truncation_side": init.get("truncation_side", "right"),
        "name_or_path": str(directory),
    }


def _read_backend(directory: Path) -> tuple[BackendTokenizer, dict]:
    """tokenizer.json as a `tokenizers` backend, and as the parsed JSON."""
    tokenizer_file = directory / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise TokenizerError(
            f"{tokenizer_file} is missing: fnlm needs the fast-tokenizer file {TOKENIZER_FILE} "
            "(re-save the tokenizer with transformers' save_pretrained to produce it)"
        )
    tokenizer_json = files.read_json(tokenizer_file, error=TokenizerError)
    if not isinstance(tokenizer_json, dict) or "model" not in tokenizer_json:
        raise TokenizerError(f"{tokenizer_file} is not a tokenizers file: it has no 'model' entry")
    try:
        backend = BackendTokenizer.from_str(json.dumps(tokenizer_json))
    except Exception as error:
        raise TokenizerError(
            f"{tokenizer_file} could not be read by the tokenizers library: {error}"
        ) from error
    return backend, tokenizer_json


def _read_tokenizer_config(directory: Path) -> dict:
    """tokenizer_config.json without the keys fnlm ignores, with the chat template(s) filled in
    from the template files, which take priority over its chat_template."""
    config = _read_json_object(directory / TOKENIZER_CONFIG_FILE, default={})
    init = dict(config)
    for key in ("tokenizer_class", "init_inputs", "add_bos_token", "add_eos_token"):
        init.pop(key, None)

    templates = _read_chat_templates(directory)
    if templates:
        init["chat_template"] = (
            templates["default"] if list(templates) == ["default"] else templates
        )
    elif init.get("chat_template") is None:
        template_json = _read_json_object(directory / CHAT_TEMPLATE_JSON_FILE, default={})
        if template_json.get("chat_template") is not None:
            init["chat_template"] = template_json["chat_template"]
    return init


def _special_tokens(
    directory: Path, init: dict, tokenizer_json: dict, backend: BackendTokenizer
) -> tuple[dict[str, str | AddedToken], list[str | AddedToken], dict[int, AddedToken]]:
    """(named special tokens, extra special tokens, added tokens to re-add to the backend),
    resolved as transformers does; `init` (tokenizer_config.json) is consumed."""
    if "additional_special_tokens" in init and not init.get("extra_special_tokens"):
        init["extra_special_tokens"] = init.pop("additional_special_tokens")
    model_specific = {
        key: init.pop(key)
        for key in list(init)
        if key not in NAMED_SPECIAL_TOKENS and key.endswith("_token") and isinstance(init[key], str)
    }
    if isinstance(init.get("extra_special_tokens"), dict):
        model_specific.update(init.pop("extra_special_tokens"))

    # Tokens that transformers re-adds to the backend, and the map used to keep a named
    # token's flags (lstrip, normalized...) when the config names it by its string.
    added_tokens_decoder: dict[int, AddedToken] = {}
    if "added_tokens_decoder" in init:
        for index, token in init.pop("added_tokens_decoder").items():
            added_tokens_decoder[int(index)] = _as_added_token(
                token, directory / TOKENIZER_CONFIG_FILE
            )
    else:
        _read_legacy_special_tokens(directory, init, model_specific, added_tokens_decoder)
        for token in tokenizer_json.get("added_tokens") or []:
            fields = {k: v for k, v in token.items() if k != "id"}
            added_tokens_decoder[int(token["id"])] = AddedToken(**fields)

    init = _convert_typed(init, directory / TOKENIZER_CONFIG_FILE)
    if "additional_special_tokens" in init and "extra_special_tokens" not in init:
        init["extra_special_tokens"] = init.pop("additional_special_tokens")
    for key in list(init):
        if (
            key not in NAMED_SPECIAL_TOKENS
            and key.endswith("_token")
            and isinstance(init[key], AddedToken)
        ):
            model_specific[key] = init.pop(key)
    padding = backend.padding
    if padding is not None and "pad_token" not in init and padding.get("pad_token"):
        # transformers takes the pad token of a tokenizer.json padding block as a default.
        init["pad_token"] = padding["pad_token"]
    added_by_content = {str(t): t for t in added_tokens_decoder.values()}
    special: dict[str, str | AddedToken] = {}
    for key in NAMED_SPECIAL_TOKENS:
        value = init.get(key)
        if value is not None:
            special[key] = added_by_content.get(str(token_content(value)), value)
    for key, value in model_specific.items():
        if value is not None:
            special[key] = _convert_typed(value, directory / TOKENIZER_CONFIG_FILE)
    for key, value in list(special.items()):
        if not isinstance(value, (str, AddedToken)):
            raise TokenizerError(
                f"{directory / TOKENIZER_CONFIG_FILE}: {key} must be a string or an AddedToken "
                f"object, got {value!r}"
            )
    extra = init.get("extra_special_tokens") or []
    if not isinstance(extra, list):
        raise TokenizerError(
            f"{directory / TOKENIZER_CONFIG_FILE}: extra_special_tokens must be a list or a "
            f"dict, got {type(extra).__name__}"
        )
    extra = [_convert_typed(t, directory / TOKENIZER_CONFIG_FILE) for t in extra]
    return special, extra, added_tokens_decoder


def _read_legacy_special_tokens(
    directory: Path, init: dict, model_specific: dict, added_tokens_decoder: dict[int, AddedToken]
) -> None:
    """Without added_tokens_decoder, transformers reads special_tokens_map.json into `init` and
    added_tokens.json into `added_tokens_decoder` (both updated in place)."""
    special_map_file = directory / SPECIAL_TOKENS_MAP_FILE
    for key, value in _read_json_object(special_map_file, default={}).items():
        if isinstance(value, dict) and key != "extra_special_tokens":
            value = {k: v for k, v in value.items() if k != "special"}
            value = _as_added_token({**value, "special": True}, special_map_file)
        elif key == "extra_special_tokens" and isinstance(value, list):
            merged = list(init.get("extra_special_tokens") or [])
            for token in value:
                token = (
                    _as_added_token({**token, "special": True}, special_map_file)
                    if isinstance(token, dict)
                    else token
                )
                if token not in merged:
                    merged.append(token)
            value = merged
        init[key] = value
    if isinstance(init.get("extra_special_tokens"), dict):
        model_specific.update(init.pop("extra_special_tokens"))
    legacy_added = _read_json_object(directory / ADDED_TOKENS_FILE, default={})
    if legacy_added:
        named = {str(token_content(init[k])) for k in NAMED_SPECIAL_TOKENS if init.get(k)}
        named |= {str(token_content(t)) for t in init.get("extra_special_tokens") or []}
        for content, index in legacy_added.items():
            special = content in named
            added_tokens_decoder[int(index)] = AddedToken(
                content, normalized=not special, special=special
            )


def _read_generation_config(directory: Path) -> tuple[list[int], Any]:
    """generation_config.json's eos ids (a list) and its pad_token_id (as given, or None)."""
    generation = _read_json_object(directory / GENERATION_CONFIG_FILE, default={})
    generation_eos = generation.get("eos_token_id")
    generation_eos = (
        []
        if generation_eos is None
        else list(generation_eos)
        if isinstance(generation_eos, list)
        else [generation_eos]
    )
    if not all(isinstance(i, int) for i in generation_eos):
        raise TokenizerError(
            f"{directory / GENERATION_CONFIG_FILE}: eos_token_id must be an int or a list of "
            f"ints, got {generation.get('eos_token_id')!r}"
        )
    generation_pad = generation.get("pad_token_id")
    if isinstance(generation_pad, list):
        generation_pad = generation_pad[0] if generation_pad else None
    return generation_eos, generation_pad


def _read_json_object(path: Path, *, default: dict) -> dict:
    if not path.is_file():
        return default
    return files.read_json(path, error=TokenizerError, expect=dict)


def _read_chat_templates(directory: Path) -> dict[str, str]:
    templates = {}
    for name, path in [("default", directory / CHAT_TEMPLATE_FILE)] + [
        (p.name.removesuffix(".jinja"), p)
        for p in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja"))
    ]:
        if path.is_file():
            try:
                templates[name] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise TokenizerError(f"{path} could not be read: {error}") from error
    return templates


_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


def _as_added_token(value, source: Path) -> AddedToken:
    if isinstance(value, AddedToken):
        return value
    if isinstance(value, str):
        return AddedToken(value, special=True)
    if not isinstance(value, dict) or "content" not in value:
        raise TokenizerError(f"{source}: expected a token object with a 'content', got {value!r}")
    fields = {k: v for k, v in value.items() if k in _ADDED_TOKEN_FIELDS}
    return AddedToken(**fields)


def _convert_typed(value, source: Path):
    # transformers' convert_added_tokens: {"__type": "AddedToken", ...} anywhere becomes an
    # AddedToken; a bare {"content": ...} in a token slot is read the same way.
    if isinstance(value, dict) and value.get("__type") == "AddedToken":
        return _as_added_token({k: v for k, v in value.items() if k != "__type"}, source)
    if isinstance(value, list):
        return [_convert_typed(v, source) for v in value]
    if isinstance(value, dict):
        if "content" in value and set(value) <= set(_ADDED_TOKEN_FIELDS):
            return _as_added_token(value, source)
        return {k: _convert_typed(v, source) for k, v in value.items()}
    return value


def token_content(token):
    """The string of a token given as a string or an AddedToken."""
    return token.content if isinstance(token, AddedToken) else token


def added_token_fields(token: AddedToken) -> dict:
    """An AddedToken as the dict of tokenizer_config.json's added_tokens_decoder."""
    return {field: getattr(token, field) for field in _ADDED_TOKEN_FIELDS}


def _add_special_tokens_to_backend(
    backend: BackendTokenizer,
    added_tokens_decoder: dict[int, AddedToken],
    special: dict[str, str | AddedToken],
    extra: list[str | AddedToken],
) -> None:
    # transformers' TokenizersBackend.__init__: the config's added tokens are re-added (its
    # "already present" test compares against dict keys, so it never matches), then every named or
    # extra special token that is not yet an added token is added as a special one. A token that
    # is already in the base vocabulary keeps its id but becomes an added token, so it is matched
    # whole in text and dropped by decode(skip_special_tokens=True).
    to_add: list[str | AddedToken] = [token for _, token in sorted(added_tokens_decoder.items())]
    present = [t.content for t in backend.get_added_tokens_decoder().values()]
    present += [str(token_content(t)) for t in to_add]
    for token in [*special.values(), *extra]:
        if str(token_content(token)) not in present and token not in to_add:
            to_add.append(token)
    if not to_add:
        return
    named = [str(token_content(t)) for t in special.values()]
    tokens = []
    for token in to_add:
        if isinstance(token, str):
            token = AddedToken(token, special=True)
        elif not token.special and token.content in named:
            token.special = True
        tokens.append(token)
    backend.add_tokens(tokens)
