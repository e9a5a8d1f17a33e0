"""Errors a user can act on, each with its process exit code.

The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``.
Anything that is not a :class:`UserError` is a bug in the tool: the CLI prints
a one-line "internal error, please report" and exits with
:data:`INTERNAL_ERROR_EXIT` (the traceback is shown with ``--debug`` or
``ONNX_INTRAFUSION_DEBUG=1``).  Nothing is ever written in either case.

Exit codes: 0 ok, 1 internal error (a bug), 2 bad option, 3 bad or unsupported
model, 4 nothing prunable, 5 validation failed, 6 output not writable,
7 execution provider not usable, 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM).
"""

#: Exit code of an unexpected exception (a bug in the tool).
INTERNAL_ERROR_EXIT = 1
#: Exit code after Ctrl-C (128 + SIGINT) and after SIGTERM (128 + SIGTERM).
INTERRUPTED_EXIT = 130
TERMINATED_EXIT = 143


class PruneWarning(UserWarning):
    """Something the user should know that did not stop the run (e.g. a custom op left a group unpruned)."""


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
