"""Errors a user can act on, each with its process exit code.

The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``;
anything that is not a :class:`UserError` is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or options (not a bug in the tool)."""

    exit_code = 2


class UsageError(UserError):
    """Bad command-line option or API argument."""

    exit_code = 2


class ModelError(UserError):
    """The input model cannot be read, is invalid, or is of a kind we refuse."""

    exit_code = 3


class NothingToPrune(UserError):
    """No channel group in the model can be pruned safely."""

    exit_code = 4


class ValidationError(UserError):
    """The pruned model failed validation; nothing was written."""

    exit_code = 5


class OutputError(UserError):
    """The output path cannot be written."""

    exit_code = 6


class ProviderError(UserError):
    """The requested onnxruntime execution provider is not usable here."""

    exit_code = 7
