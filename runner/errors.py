"""The one exception type for mistakes a user can fix, and the CLI's exit codes."""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILED = 1  # the job ran and failed
EXIT_INVALID = 2  # bad input: a job file, a host, a flag
EXIT_REFUSED = 3  # valid, but the planner refuses it (does not fit, breaks a cap)


@dataclass
class UserError(Exception):
    """A problem in the user's input, located as precisely as we can.

    Rendered by the CLI as ``FILE:LINE:COL: field.path: message`` (parts that are
    unknown are left out) followed by an optional hint line.
    """

    message: str
    file: str | None = None
    line: int | None = None
    col: int | None = None
    field: str | None = None
    hint: str | None = None
    exit_code: int = EXIT_INVALID

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.col is not None:
                    where += f":{self.col}"
            where += ": "
        field = f"{self.field}: " if self.field else ""
        text = f"{where}{field}{self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class UserErrors(Exception):
    """Several user errors found in one pass (all reported, not just the first)."""

    def __init__(self, errors: list[UserError]):
        super().__init__("\n".join(e.render() for e in errors))
        self.errors = errors
        self.exit_code = max(e.exit_code for e in errors)
