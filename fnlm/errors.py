"""The one exception hierarchy of fnlm.

Every message names the thing at fault (file, tensor, row, argument), what was expected and,
where possible, what to do about it.
"""


class FnlmError(Exception):
    """Base class of every error fnlm raises on purpose."""


class ModelNotFoundError(FnlmError):
    """A local path or hub id does not exist or holds no model."""


class OfflineError(FnlmError):
    """The hub is needed but cannot be reached (offline mode or no network)."""


class ConfigError(FnlmError, ValueError):
    """A config.json (or GGUF metadata) is missing a field or holds an invalid value."""


class UnsupportedModelError(ConfigError):
    """The model_type (or a feature of it) is not implemented."""


class CheckpointError(FnlmError):
    """A weight file is corrupt or truncated, or a tensor is missing or of the wrong shape."""


class TokenizerError(FnlmError):
    """Tokenizer files are missing or malformed, or a chat template fails to render."""


class QuantError(FnlmError):
    """A quantization mode is unknown or unavailable on this device."""


class LoraError(FnlmError):
    """An adapter does not match its base model, or its config is invalid."""


class DataError(FnlmError, ValueError):
    """Training data is missing, empty or of an unknown format."""


class ArgumentError(FnlmError, ValueError):
    """A function argument has an invalid value."""


class ExportError(FnlmError):
    """An export target cannot be written."""


class DeviceMemoryError(FnlmError, MemoryError):
    """The device ran out of memory; the message says how much was needed."""
