"""Add, change and remove sections of source.ini, atomically.

Edits work on line ranges found by :mod:`dynaconnd.ini`, not by writing
the file out again through configparser, which would drop every comment.
The other sections, the comments and the file's mode stay as they were.
Each edit is validated on the resulting text before anything is written,
so a refused edit leaves the file byte for byte as it was.
"""

from __future__ import annotations

import codecs
import os
import re
import stat
from typing import TYPE_CHECKING

from dynaconnd.atomic import PRIVATE_FILE_MODE, atomic_write
from dynaconnd.config import MAX_CONFIG_BYTES, parse_config
from dynaconnd.errors import ConfigError, ConfigIssue, UnknownDatabaseError
from dynaconnd.ini import (
    COMMENT_PREFIXES,
    DEFAULT_SECTION,
    IniFile,
    read_ini,
    split_lines,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.engine import URL

    from dynaconnd.ini import IniSection

__all__ = [
    "add_section",
    "remove_section",
    "render_section",
    "update_section",
    "url_values",
]

Value = str | int | None

_KEY = re.compile(r"[a-z0-9_][a-z0-9_.\-]*")


def url_values(url: URL) -> dict[str, Value]:
    """Return the source.ini keys that name the database at ``url``.

    The result suits :func:`render_section` and the registries'
    ``add_instance``; parts the URL lacks are ``None`` (left out).
    """
    values: dict[str, Value] = {
        "source": url.drivername,
        "username": url.username,
        "password": url.password,
        "host": url.host,
        "port": url.port,
        "base": url.database,
    }
    for key, value in url.query.items():
        values[f"query.{key}"] = value if isinstance(value, str) else None
    return values


def render_section(name: str, data: Mapping[str, Value]) -> str:
    """Return ``data`` as the text of a ``[name]`` section.

    Keys with the value ``None`` are left out.  Raise ``ConfigError``
    when a name, key or value cannot be written so that it reads back
    the same.
    """
    values = _present(_clean("<data>", name, data))
    entries = [_entry(key, value) for key, value in values.items()]
    return "".join([f"[{name}]\n", *entries])


def add_section(
    path: str | os.PathLike[str],
    name: str,
    data: Mapping[str, Value],
    *,
    overwrite: bool = False,
    environ: Mapping[str, str] | None = None,
    credentials_dir: str | None = None,
) -> None:
    """Add section ``name`` holding ``data`` to the source.ini at ``path``.

    An existing section is replaced only with ``overwrite=True``; its
    leading comments stay.  A missing file is created with mode 0600.
    """
    target = _Target.read(path, missing_ok=True)
    values = _present(_clean(target.path, name, data))
    section = target.ini.sections.get(name)
    if section is not None and not overwrite:
        raise ConfigError(
            [
                ConfigIssue(
                    target.path,
                    name,
                    None,
                    section.line,
                    f"section [{name}] already exists; replace it with "
                    "overwrite=True, or change it with update_section",
                )
            ]
        )

    lines = list(target.lines)
    body = [
        target.newline_of(_entry(key, value)) for key, value in values.items()
    ]
    header = target.newline_of(f"[{name}]\n")
    if section is not None:
        lines[section.line - 1 : section.end_line] = [header, *body]
    else:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += target.newline
        if lines and lines[-1].strip():
            lines.append(target.newline)
        lines.extend([header, *body])
    target.write(
        name, lines, values, environ=environ, credentials_dir=credentials_dir
    )


def update_section(
    path: str | os.PathLike[str],
    name: str,
    data: Mapping[str, Value],
    *,
    environ: Mapping[str, str] | None = None,
    credentials_dir: str | None = None,
) -> None:
    """Merge ``data`` into section ``name``; a ``None`` value removes a key.

    Keys already in the section are changed on their own line, new keys
    are added after the section's last key.
    """
    target = _Target.read(path)
    section = target.section(name)
    changes = _clean(target.path, name, data, keep_none=True)

    lines = list(target.lines)
    added: list[str] = []
    edits: list[tuple[int, int, list[str]]] = []
    for key, value in changes.items():
        entry = section.entries.get(key)
        if entry is None:
            if value is not None:
                added.append(target.newline_of(_entry(key, value)))
            continue
        replacement = (
            [] if value is None else [target.newline_of(_entry(key, value))]
        )
        edits.append((entry.line - 1, entry.end_line, replacement))
    if added:
        if not lines[section.end_line - 1].endswith("\n"):
            lines[section.end_line - 1] += target.newline
        edits.append((section.end_line, section.end_line, added))

    # Bottom first, so the line numbers of earlier edits stay right.
    for start, end, replacement in sorted(edits, reverse=True):
        lines[start:end] = replacement

    expected = {
        key: entry.value
        for key, entry in section.entries.items()
        if key not in changes
    }
    expected.update(
        {key: value for key, value in changes.items() if value is not None}
    )
    target.write(
        name,
        lines,
        expected,
        environ=environ,
        credentials_dir=credentials_dir,
    )


def remove_section(path: str | os.PathLike[str], name: str) -> None:
    """Remove section ``name``, with the comment block just above it."""
    target = _Target.read(path)
    section = target.section(name)
    if list(target.ini.sections) == [name]:
        raise ConfigError(
            [
                ConfigIssue(
                    target.path,
                    name,
                    None,
                    section.line,
                    "is the only database section; source.ini would be "
                    "left with none, and an empty file is never applied",
                )
            ]
        )

    lines = list(target.lines)
    start = section.line - 1
    while start > 0 and _is_comment(lines[start - 1]):
        start -= 1
    end = section.end_line
    trailing = end
    while trailing < len(lines) and _is_comment(lines[trailing]):
        trailing += 1
    # Comments running straight into the next header belong to it.
    next_is_header = trailing < len(lines) and lines[trailing].strip()
    if not next_is_header:
        end = trailing
    if start == 0 or not lines[start - 1].strip():
        while end < len(lines) and not lines[end].strip():
            end += 1
    if end == len(lines):
        # The last section goes: so do the blank lines that led to it.
        while start > 0 and not lines[start - 1].strip():
            start -= 1
    del lines[start:end]
    target.write(name, lines, None)


def _is_comment(line: str) -> bool:
    return line.strip().startswith(COMMENT_PREFIXES)


def _present(values: Mapping[str, str | None]) -> dict[str, str]:
    return {key: value for key, value in values.items() if value is not None}


def _entry(key: str, value: str) -> str:
    return f"{key} = {value}\n" if value else f"{key} =\n"


def _clean(
    path: str,
    name: str,
    data: Mapping[str, Value],
    *,
    keep_none: bool = False,
) -> dict[str, str | None]:
    """Return ``data`` with lower-case keys and text values, or raise."""
    issues: list[ConfigIssue] = []

    def problem(key: str | None, message: str) -> None:
        issues.append(ConfigIssue(path, name, key, None, message))

    if name == DEFAULT_SECTION:
        problem(None, f"[{DEFAULT_SECTION}] is not a database name")
    elif not name or name != name.strip() or "\n" in name or "\r" in name:
        problem(
            None,
            "a section name must not be blank, hold line breaks, nor "
            "start or end with spaces",
        )

    values: dict[str, str | None] = {}
    for written, value in data.items():
        key = written.lower()
        if not _KEY.fullmatch(key):
            problem(
                None,
                f"{written!r} cannot be written as a key; keys are "
                "letters, digits, '_', '.' and '-'",
            )
            continue
        if key in values:
            problem(key, "is given twice (keys are case-insensitive)")
            continue
        if value is None:
            if keep_none:
                values[key] = None
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        # Never echo the value: it may be a password.
        if "\n" in text or "\r" in text:
            problem(key, "holds a line break, which source.ini cannot keep")
        elif text != text.strip():
            problem(
                key,
                "starts or ends with spaces, which source.ini drops when "
                "it reads the file",
            )
        values[key] = text
    if issues:
        raise ConfigError(issues)
    return values


class _Target:
    """The source.ini being edited: where it is, its text and its mode."""

    def __init__(
        self, path: str, data: bytes, mode: int, *, exists: bool
    ) -> None:
        self.path = path
        self.data = data
        self.mode = mode
        self.exists = exists
        self.ini: IniFile = read_ini(data, path=path)
        self.lines = split_lines(self.ini.text)
        first = self.lines[0] if self.lines else ""
        self.newline = "\r\n" if first.endswith("\r\n") else "\n"

    @classmethod
    def read(
        cls, path: str | os.PathLike[str], *, missing_ok: bool = False
    ) -> _Target:
        """Read the file at ``path``; raise ``ConfigError`` if unusable."""
        shown = os.fspath(path)
        # Edit the file a symlink points at, leaving the link in place.
        real = os.path.realpath(shown)
        try:
            with open(real, "rb") as handle:
                mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
                data = handle.read(MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            if not missing_ok:
                raise _file_error(shown, "does not exist") from None
            return cls(shown, b"", PRIVATE_FILE_MODE, exists=False)
        except OSError as error:
            raise _file_error(
                shown, f"cannot be read: {error.strerror or error}"
            ) from None
        if len(data) > MAX_CONFIG_BYTES:
            raise _file_error(
                shown, f"is larger than {MAX_CONFIG_BYTES} bytes"
            )
        return cls(shown, data, mode, exists=True)

    def newline_of(self, line: str) -> str:
        """Return ``line`` ending the way the file's lines end."""
        return line.removesuffix("\n") + self.newline

    def section(self, name: str) -> IniSection:
        """Return section ``name``, or raise ``UnknownDatabaseError``."""
        try:
            return self.ini.sections[name]
        except KeyError:
            known = ", ".join(self.ini.sections) or "none"
            raise UnknownDatabaseError(
                f"{self.path} has no section [{name}]; sections: {known}"
            ) from None

    def write(
        self,
        name: str,
        lines: list[str],
        expected: Mapping[str, str | None] | None,
        *,
        environ: Mapping[str, str] | None = None,
        credentials_dir: str | None = None,
    ) -> None:
        """Validate the edited ``lines``, then replace the file with them.

        ``expected`` is what section ``name`` must read back as, or
        ``None`` when the section is being removed.
        """
        text = "".join(lines)
        data = (codecs.BOM_UTF8 if self.ini.has_bom else b"") + text.encode(
            "utf-8"
        )
        loaded = parse_config(
            data,
            path=self.path,
            environ=environ,
            credentials_dir=credentials_dir,
        )

        if expected is not None:
            if name in loaded.rejected:
                raise ConfigError(list(loaded.rejected[name]))
            read_back = read_ini(data, path=self.path).sections[name]
            actual = {key: e.value for key, e in read_back.entries.items()}
            if actual != expected:
                raise _file_error(
                    self.path,
                    f"section [{name}] would not read back as written; "
                    "nothing was changed",
                )
        elif name in read_ini(data, path=self.path).sections:
            raise _file_error(
                self.path, f"section [{name}] could not be removed"
            )

        if self.exists and data == self.data:
            return
        atomic_write(os.path.realpath(self.path), data, mode=self.mode)


def _file_error(path: str, message: str) -> ConfigError:
    return ConfigError([ConfigIssue(path, None, None, None, message)])
