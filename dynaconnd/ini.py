"""Read source.ini text into raw sections that remember their line numbers.

The values come from :mod:`configparser` itself (no interpolation, no
inline comments, strict about duplicates), so source.ini means what any
other INI reader of the Python world takes it to mean.  configparser,
however, stops at the first duplicate section or key and forgets where
each value came from; a thin line index, walking the file with
configparser's own regular expressions and rules, finds every problem at
once and keeps the line of each header and key for error messages and
for editing the file in place.
"""

from __future__ import annotations

import codecs
import configparser
import dataclasses
import io
import sys
from typing import TYPE_CHECKING

from dynaconnd.errors import ConfigError, ConfigIssue

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "COMMENT_PREFIXES",
    "DEFAULT_SECTION",
    "IniEntry",
    "IniFile",
    "IniSection",
    "decode_ini",
    "read_ini",
    "split_lines",
]

DEFAULT_SECTION = configparser.DEFAULTSECT
COMMENT_PREFIXES = ("#", ";")

_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_UTF32_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)


@dataclasses.dataclass(frozen=True)
class IniEntry:
    """One ``key = value`` pair, with the lines it spans."""

    key: str
    value: str
    section: str
    line: int
    end_line: int


@dataclasses.dataclass(frozen=True)
class IniSection:
    """One ``[section]``: its header line and its own entries.

    ``end_line`` is the last line of its last entry (the header line when
    it has none); comments and blank lines after it are not counted.
    """

    name: str
    line: int
    end_line: int
    entries: Mapping[str, IniEntry]


@dataclasses.dataclass(frozen=True)
class IniFile:
    """A whole source.ini: its text and its sections in file order."""

    path: str
    text: str
    has_bom: bool
    defaults: IniSection | None
    sections: Mapping[str, IniSection]

    def merged(self, name: str) -> dict[str, IniEntry]:
        """Return the entries of section ``name`` with [DEFAULT] beneath."""
        entries = dict(self.defaults.entries) if self.defaults else {}
        entries.update(self.sections[name].entries)
        return entries


def split_lines(text: str) -> list[str]:
    """Split ``text`` into lines, with their endings, as configparser does.

    Only ``\\n`` ends a line (a ``\\r`` before it stays with the line and
    is stripped with the other whitespace).
    """
    return io.StringIO(text).readlines()


def decode_ini(data: bytes, *, path: str) -> tuple[str, bool]:
    """Return the text of ``data`` and whether it began with a UTF-8 BOM.

    Raise ``ConfigError`` when the bytes are not UTF-8 text.
    """
    if data.startswith(_UTF32_BOMS):
        # UTF-32 LE starts with the UTF-16 LE mark, so it is tested first.
        raise _file_error(path, "is UTF-32 text; save it as UTF-8")
    if data.startswith(_UTF16_BOMS):
        raise _file_error(path, "is UTF-16 text; save it as UTF-8")
    if b"\x00" in data:
        line = data.count(b"\n", 0, data.index(b"\x00")) + 1
        raise ConfigError(
            [
                ConfigIssue(
                    path,
                    None,
                    None,
                    line,
                    "contains a NUL byte, so it is binary or UTF-16; "
                    "source.ini must be UTF-8 text",
                )
            ]
        )

    has_bom = data.startswith(codecs.BOM_UTF8)
    body = data[len(codecs.BOM_UTF8) :] if has_bom else data
    try:
        return body.decode("utf-8"), has_bom
    except UnicodeDecodeError as error:
        line = body.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            [
                ConfigIssue(
                    path,
                    None,
                    None,
                    line,
                    f"is not valid UTF-8 (byte {error.start + 1} of the "
                    "file); source.ini must be UTF-8 text",
                )
            ]
        ) from None


def read_ini(data: bytes, *, path: str) -> IniFile:
    """Read source.ini bytes into sections with line numbers.

    Raise ``ConfigError`` listing every problem: encoding, lines that
    are neither a header, a ``key = value`` pair nor a comment, keys
    before any section, duplicate sections and duplicate keys (keys are
    case-insensitive, section names are not).
    """
    text, has_bom = decode_ini(data, path=path)
    index = _LineIndex(path)
    for number, line in enumerate(split_lines(text), start=1):
        index.feed(number, line)
    if index.issues:
        raise ConfigError(index.issues)

    parser = _parse(text, path)
    return IniFile(
        path=path,
        text=text,
        has_bom=has_bom,
        defaults=(
            index.section(DEFAULT_SECTION, parser)
            if DEFAULT_SECTION in index.headers
            else None
        ),
        sections={
            name: index.section(name, parser)
            for name in index.headers
            if name != DEFAULT_SECTION
        },
    )


def _file_error(path: str, message: str) -> ConfigError:
    return ConfigError([ConfigIssue(path, None, None, None, message)])


def _new_parser() -> configparser.RawConfigParser:
    return configparser.RawConfigParser(
        delimiters=("=", ":"),
        comment_prefixes=COMMENT_PREFIXES,
        # A ';' or '#' inside a value is part of it: passwords have them.
        inline_comment_prefixes=None,
        strict=True,
        empty_lines_in_values=False,
        default_section=DEFAULT_SECTION,
        interpolation=None,
    )


def _parse(text: str, path: str) -> configparser.RawConfigParser:
    parser = _new_parser()
    try:
        parser.read_string(text, source=path)
    except configparser.Error as error:
        # The line index has already reported anything configparser
        # rejects; this stays as a guard should the two ever disagree.
        line = getattr(error, "lineno", None)
        message = f"cannot be parsed: {error.__class__.__name__}"
        raise ConfigError(
            [ConfigIssue(path, None, None, line, message)]
        ) from None
    return parser


class _LineIndex:
    """Walk the lines as ``RawConfigParser._read`` does, noting lines.

    It mirrors the rules of the parser built by ``_new_parser``: full
    line comments and blank lines end a multi-line value, deeper indented
    lines continue it, and the first ``=`` or ``:`` splits key from value.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.issues: list[ConfigIssue] = []
        self.headers: dict[str, int] = {}
        self.keys: dict[str, dict[str, tuple[str, int, int]]] = {}
        self._parser = _new_parser()
        self._section: str | None = None
        self._key: str | None = None
        self._indent = 0
        self._ends: dict[str, int] = {}
        self._keys: dict[str, tuple[str, int, int]] = {}
        self._is_copy = False

    def feed(self, number: int, line: str) -> None:
        """Account for line ``number`` of the file."""
        stripped = line.strip()
        if not stripped or stripped.startswith(COMMENT_PREFIXES):
            # empty_lines_in_values=False: a blank or comment line ends a
            # multi-line value.
            self._indent = sys.maxsize
            return

        first = self._parser.NONSPACECRE.search(line)
        indent = first.start() if first else 0
        if (
            self._section is not None
            and self._key is not None
            and indent > self._indent
        ):
            self._continue(number)
            return

        self._indent = indent
        header = self._parser.SECTCRE.match(stripped)
        if header is not None:
            self._open(header.group("header"), number)
            return

        option = self._parser.OPTCRE.match(stripped)
        if self._section is None:
            what = (
                f"key {option.group('option').strip().lower()!r}"
                if option is not None and option.group("option").strip()
                else "this line"
            )
            self._issue(
                None,
                None,
                number,
                f"{what} comes before any [section] header; every key "
                "belongs to a section such as [my_db] or [DEFAULT]",
            )
            return
        if option is None:
            self._issue(
                self._section,
                None,
                number,
                "line is not 'key = value', a [section] header or a "
                "comment starting with # or ;",
            )
            return
        self._add_key(option.group("option").rstrip(), number)

    def section(
        self, name: str, parser: configparser.RawConfigParser
    ) -> IniSection:
        """Return the indexed section ``name`` with configparser's values."""
        if name == DEFAULT_SECTION:
            values = parser.defaults()
        else:
            # Own keys only: [DEFAULT] is merged later, by IniFile.merged.
            values = {
                key: parser.get(name, key, raw=True) for key in self.keys[name]
            }
        entries = {
            key: IniEntry(
                key=key,
                value=values[key],
                section=name,
                line=line,
                end_line=end,
            )
            for key, (_, line, end) in self.keys[name].items()
        }
        return IniSection(
            name=name,
            line=self.headers[name],
            end_line=self._ends[name],
            entries=entries,
        )

    def _open(self, name: str, number: int) -> None:
        self._key = None
        self._section = name
        if name in self.headers:
            first = self.headers[name]
            self._issue(
                name,
                None,
                number,
                f"section [{name}] appears twice, at line {first} and "
                f"at line {number}; each section may appear only once",
            )
            # The copy's keys are checked among themselves only, so one
            # duplicate section is one issue, not one per key.
            self._keys = {}
            self._is_copy = True
            return
        self.headers[name] = number
        self._keys = self.keys[name] = {}
        self._is_copy = False
        self._ends[name] = number

    def _add_key(self, written: str, number: int) -> None:
        assert self._section is not None
        key = self._parser.optionxform(written)
        if not key:
            self._key = None
            self._issue(
                self._section,
                None,
                number,
                "line has no key before its '=' or ':'",
            )
            return
        # A duplicate still owns its continuation lines: they are not
        # separate problems.  The file is refused anyway.
        self._key = key
        if key in self._keys:
            first_written, first, _ = self._keys[key]
            self._issue(
                self._section,
                key,
                number,
                f"key {key!r} appears twice in [{self._section}]: as "
                f"{first_written!r} at line {first} and as {written!r} "
                f"at line {number} (keys are case-insensitive)",
            )
            return
        self._keys[key] = (written, number, number)
        self._extend(number)

    def _continue(self, number: int) -> None:
        if self._key is None or self._key not in self._keys:
            return
        written, line, _ = self._keys[self._key]
        self._keys[self._key] = (written, line, number)
        self._extend(number)

    def _extend(self, number: int) -> None:
        if self._section is not None and not self._is_copy:
            self._ends[self._section] = number

    def _issue(
        self, section: str | None, key: str | None, line: int, message: str
    ) -> None:
        self.issues.append(ConfigIssue(self.path, section, key, line, message))
