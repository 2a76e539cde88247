"""One exception tree for everything llmx reports to a user.

The CLI prints `str(error)` as one line and exits 1; the server maps subclasses to HTTP codes.
Messages say what went wrong and, where there is one, what to do about it.
"""


class LlmxError(Exception):
    """Base of every error llmx raises on purpose."""


class ModelNotFoundError(LlmxError):
    """A model path that does not exist, or a default model that is not installed."""


class GGUFError(LlmxError):
    """A file that is not a valid GGUF: bad magic, truncated, inconsistent header."""


class UnsupportedModelError(LlmxError):
    """A valid GGUF that llmx cannot run: unknown architecture or tokenizer."""


class TokenizerError(LlmxError):
    """A vocabulary that cannot be turned into a tokenizer."""


class ChatTemplateError(LlmxError):
    """A chat template that fails to render or reaches for what the sandbox forbids."""


class UsageError(LlmxError):
    """Bad arguments; the CLI exits 2 for these."""
