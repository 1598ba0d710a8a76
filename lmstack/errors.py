"""Errors that reach the user as one clear line (CLI exit code 2, HTTP 4xx)."""


class LmstackError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug."""


class ModelLoadError(LmstackError):
    """The model file or directory is missing, corrupt, or not a supported model."""


class InputError(LmstackError):
    """A value given by the user is invalid; the message names the value and the limit."""


class ContextLengthError(InputError):
    """A prompt (plus requested output) does not fit the model's context window."""

    def __init__(self, prompt_tokens: int, limit: int, what: str = "prompt"):
        self.prompt_tokens = prompt_tokens
        self.limit = limit
        super().__init__(
            f"{what} is {prompt_tokens} tokens, longer than the model's context window of "
            f"{limit} tokens"
        )


class EngineDeadError(LmstackError):
    """The engine's step thread has stopped: nothing can be generated until a restart (503)."""
