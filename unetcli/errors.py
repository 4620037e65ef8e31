"""One project error type; the CLI turns it into a message, a hint and an exit code."""

from __future__ import annotations


class UnetCliError(Exception):
    """An error the user can fix: says what is wrong (``message``) and how to fix it (``hint``).

    Lower layers raise this (or a subclass) and never print or exit; ``cli.main`` turns it
    into one line on stderr and ``exit_code``.
    """

    exit_code: int = 2
    quiet: bool = False
    """Exit with ``exit_code`` but print nothing: another process (a torchrun rank) already printed it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(UnetCliError):
    """A configuration file, key, value or flag is wrong."""


class DataError(UnetCliError):
    """An input image, mask or dataset folder is missing, unreadable or inconsistent."""

    @classmethod
    def from_problems(cls, problems: list[str], hint: str | None = None, limit: int = 20) -> "DataError":
        """One line per problem (all of them, up to ``limit``), so a user fixes a dataset in one go."""
        shown = problems[:limit]
        if len(problems) > limit:
            shown.append(f"... and {len(problems) - limit} more problems")
        return cls("\n".join(shown), hint)


class ModelError(UnetCliError):
    """A network cannot be built or cannot take the given input."""


class CheckpointError(UnetCliError):
    """A checkpoint or run folder is missing, corrupt, unsafe or incompatible."""


class OutputError(UnetCliError):
    """An output location is unsafe (an input folder, existing files) or not writable."""


class TrainingError(UnetCliError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""

    exit_code = 3


class Interrupted(UnetCliError):
    """Training was stopped by SIGINT (Ctrl-C) or SIGTERM after saving a checkpoint; exits 128 + signal."""

    def __init__(self, message: str, signum: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.signum = signum
        self.exit_code = 128 + int(signum)
