"""How a refused file is reported: one `ConfigIssue` per problem, all in one `ConfigError`."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConfigError", "ConfigIssue"]


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in the file: where it is, what is wrong, and how to fix it."""

    line: int | None
    where: str  # the field's path, like "keys[2].acls"
    message: str
    hint: str | None = None
    file: str | None = None  # the `keys_file` the line is in; None: the configuration file

    def format(self, source: str) -> str:
        source = self.file or source
        location = source if self.line is None else f"{source}:{self.line}"
        text = (
            f"{location}: {self.where}: {self.message}"
            if self.where
            else f"{location}: {self.message}"
        )
        return f"{text} (hint: {self.hint})" if self.hint else text


class ConfigError(Exception):
    """The file was refused; `issues` lists every problem found, in file order."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        super().__init__(source, issues)
        self.source = source
        self.issues = issues

    def __str__(self) -> str:
        return "\n".join(issue.format(self.source) for issue in self.issues)
