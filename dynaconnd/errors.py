"""The exceptions raised by magenta-dynaconn, under one root.

Every leaf also subclasses the builtin that matches its meaning, so code
that already catches ``KeyError`` or ``ValueError`` keeps working.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "DynaconnError",
    "InsecureFileError",
    "MissingDriverError",
    "NoPrimaryKeyError",
    "ProtocolMismatchError",
    "RegistryUnavailableError",
    "SocketInUseError",
    "UnknownDatabaseError",
    "UnknownTableError",
    "WritesDisabledError",
]


class DynaconnError(Exception):
    """The root of every error magenta-dynaconn raises on purpose."""


@dataclasses.dataclass(frozen=True)
class ConfigIssue:
    """One problem found in a configuration file.

    ``section``, ``key`` and ``line`` are ``None`` when the problem is
    about the file as a whole.  ``message`` never contains a secret.
    """

    file: str
    section: str | None
    key: str | None
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
        if self.section is not None:
            where += f" [{self.section}]"
        if self.key is not None:
            where += f" {self.key}"
        return f"{where}: {self.message}"

    def as_dict(self) -> dict[str, str | int | None]:
        """Return the issue as plain data, fit for a log event or a socket."""
        return dataclasses.asdict(self)


class ConfigError(DynaconnError, ValueError):
    """A configuration file, or part of one, is invalid.

    ``issues`` lists every problem found, not only the first.
    """

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = list(issues)
        lines = "\n".join(f"  {issue}" for issue in self.issues)
        count = len(self.issues)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"{count} configuration {noun}:\n{lines}")

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[ConfigIssue]]]:
        # Exceptions pickle their message by default; the socket needs
        # the issues themselves to rebuild the error in the client.
        return (type(self), (self.issues,))


class MissingDriverError(DynaconnError, ImportError):
    """The database driver a section asks for is not installed."""


class UnknownDatabaseError(DynaconnError, KeyError):
    """No database of that name is in the registry."""

    def __str__(self) -> str:
        # KeyError quotes its argument; the message is already a sentence.
        return str(self.args[0]) if self.args else ""


class UnknownTableError(DynaconnError, KeyError):
    """The database has no table of that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NoPrimaryKeyError(DynaconnError, LookupError):
    """A table or view has no primary key, so it cannot be mapped."""


class RegistryUnavailableError(DynaconnError, ConnectionError):
    """The daemon could not be reached within the time allowed."""


class ProtocolMismatchError(DynaconnError, RuntimeError):
    """The client and the daemon speak different protocol versions."""


class WritesDisabledError(DynaconnError, PermissionError):
    """The daemon refuses to change source.ini without --allow-writes."""


class InsecureFileError(DynaconnError, PermissionError):
    """A key file or socket folder is open to users it must not be."""


class SocketInUseError(DynaconnError, FileExistsError):
    """Another process serves on the socket path, or it is no socket."""
