"""The one error type that users see: bad input, reported as one line per problem, exit code 2."""

from __future__ import annotations

from collections.abc import Iterable

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad input (a file, a config key, a data folder). Each problem names the file or key and what is wrong.

    The CLI prints every problem on its own line, without a traceback, and exits with code 2.
    """

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def problem(where: object, what: str) -> str:
    """Format one problem line: ``<file or key>: <what is wrong>``."""
    return f"{where}: {what}"


class ProblemList:
    """Collects problems while a whole dataset is validated, so that all of them are reported at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: object, what: str) -> None:
        self.items.append(problem(where, what))

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise InputError(self.items)

EXIT_TRAINING_FAULT = 3


class NumericalFault(RuntimeError):
    """A NaN or inf appeared during training; the message names epoch, iteration and method (exit code 3).

    Training stops before the optimiser step, so the last checkpoint on disk is the last good one.
    """
