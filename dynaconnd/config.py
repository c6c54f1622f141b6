"""Validate source.ini: raw sections in, typed ``DatabaseSpec`` objects out.

A file that cannot be used as a whole (unreadable, not UTF-8, a syntax
error, a duplicate) raises ``ConfigError``.  Otherwise each section is
judged on its own: a bad one lands in ``LoadedConfig.rejected`` with all
of its issues, so one typo never takes the other databases down.

No issue message ever holds a password: values are echoed only when no
secret of the section occurs in them, and a last pass masks any secret
that slipped into a message anyway.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import os
import re
import stat
import unicodedata
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from dynaconnd.durations import parse_duration
from dynaconnd.errors import ConfigError, ConfigIssue
from dynaconnd.ini import DEFAULT_SECTION, read_ini
from dynaconnd.logs import MASK, remember_secret
from dynaconnd.secrets import (
    CREDENTIALS_ENV,
    SecretError,
    expand_references,
    read_credential,
    read_password_file,
    resolve_path,
)
from dynaconnd.spec import (
    DatabaseSpec,
    EngineOptions,
    ReflectionScope,
    Schedule,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "DEFAULT_DRIVERS",
    "KNOWN_KEYS",
    "KNOWN_SOURCES",
    "MAX_CONFIG_BYTES",
    "LoadedConfig",
    "load_config",
    "parse_config",
    "validate_section",
]

#: A source.ini larger than this is refused rather than parsed.
MAX_CONFIG_BYTES = 4 * 1024 * 1024

#: The database kinds ``source`` names, in the order messages list them.
KNOWN_SOURCES = ("sqlite", "postgresql", "mysql", "mariadb")

#: The driver used when ``source`` or ``url`` names only the dialect.
#: ``mariadb`` keeps SQLAlchemy's MariaDB dialect (``mariadb+pymysql``),
#: which refuses to talk to a MySQL server by mistake.
DEFAULT_DRIVERS = {
    "postgresql": "psycopg",
    "mysql": "pymysql",
    "mariadb": "pymysql",
    "sqlite": "pysqlite",
}

# Drivers SQLAlchemy ships per dialect, for "did you mean" and listings.
_DRIVERS = {
    "postgresql": ("psycopg", "psycopg2", "pg8000", "psycopg2cffi"),
    "mysql": ("pymysql", "mysqldb", "mysqlconnector", "mariadbconnector"),
    "mariadb": ("pymysql", "mysqldb", "mysqlconnector", "mariadbconnector"),
    "sqlite": ("pysqlite", "pysqlcipher"),
}

# The pip extra of this project that installs each default driver.
_EXTRAS = {"postgresql": "postgresql", "mysql": "mysql", "mariadb": "mysql"}

_PIP_NAMES = {
    "psycopg2": "psycopg2-binary",
    "mysqldb": "mysqlclient",
    "mysqlconnector": "mysql-connector-python",
    "mariadbconnector": "mariadb",
}

_URL_PARTS = ("source", "driver", "username", "password", "host", "port")
_SEED_KEYS = ("source", "username", "password", "host", "port", "base")
_SECRET_KEYS = ("password", "password_file", "password_credential")
_SERVER_KEYS = ("username", "host", "port", *_SECRET_KEYS)
_INT_KEYS = {"pool_size": 0, "max_overflow": -1}
_DURATION_KEYS = (
    "pool_recycle",
    "pool_timeout",
    "connect_timeout",
    "health_interval",
    "health_timeout",
    "reflect_interval",
)
_BOOL_KEYS = ("pool_pre_ping", "echo")
_LIST_KEYS = ("schemas", "include_tables", "exclude_tables")
_QUERY_PREFIX = "query."

#: Every key a database section may hold, besides ``query.<name>``.
KNOWN_KEYS = frozenset(
    (
        *_SEED_KEYS,
        "driver",
        "url",
        *_INT_KEYS,
        *_DURATION_KEYS,
        *_BOOL_KEYS,
        *_LIST_KEYS,
        *_SECRET_KEYS,
    )
)

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_DRIVERNAME = re.compile(r"[a-z][a-z0-9_]*(?:\+[a-z][a-z0-9_]*)?")
_URL_SHAPE = (
    "dialect+driver://username:password@host:port/database, with "
    "special characters in the parts percent-encoded"
)

_T = TypeVar("_T")

# Driver names whose DBAPI module imported once; a failure is not kept,
# so installing the driver later is noticed by the next reload.
_loadable: set[str] = set()


@dataclasses.dataclass(frozen=True)
class LoadedConfig:
    """A source.ini read and validated, section by section."""

    path: str
    specs: Mapping[str, DatabaseSpec]
    rejected: Mapping[str, tuple[ConfigIssue, ...]]
    content_hash: str
    watched_files: tuple[str, ...]

    @property
    def issues(self) -> tuple[ConfigIssue, ...]:
        """Return the issues of every rejected section, in file order."""
        return tuple(
            issue for issues in self.rejected.values() for issue in issues
        )


def load_config(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    credentials_dir: str | None = None,
) -> LoadedConfig:
    """Read and validate the source.ini at ``path``.

    Raise ``ConfigError`` when the file as a whole cannot be used; a bad
    section only lands in ``LoadedConfig.rejected``.
    """
    text_path = os.fspath(path)
    data = _read_bytes(text_path)
    return parse_config(
        data,
        path=text_path,
        environ=environ,
        credentials_dir=credentials_dir,
    )


def parse_config(
    data: bytes,
    *,
    path: str,
    environ: Mapping[str, str] | None = None,
    credentials_dir: str | None = None,
) -> LoadedConfig:
    """Validate source.ini ``data`` as if read from ``path``.

    ``path`` names the file in messages, and its folder anchors relative
    paths.  ``environ`` (default ``os.environ``) resolves ``${NAME}``;
    ``credentials_dir`` defaults to ``$CREDENTIALS_DIRECTORY`` in it.
    """
    if len(data) > MAX_CONFIG_BYTES:
        raise _file_error(path, _too_large(len(data)))
    ini = read_ini(data, path=path)
    if not ini.sections:
        raise _file_error(
            path,
            "has no database sections; a source.ini needs at least one "
            "[name] section, and an empty file is never applied",
        )

    specs: dict[str, DatabaseSpec] = {}
    rejected: dict[str, tuple[ConfigIssue, ...]] = {}
    watched: list[str] = []
    for name, section in ini.sections.items():
        entries = ini.merged(name)
        check = _SectionCheck(
            name,
            {key: entry.value for key, entry in entries.items()},
            path=path,
            header_line=section.line,
            lines={key: entry.line for key, entry in entries.items()},
            inherited={
                key
                for key, entry in entries.items()
                if entry.section == DEFAULT_SECTION
            },
            base_dir=_base_dir(path),
            environ=environ,
            credentials_dir=credentials_dir,
        )
        spec = check.run()
        watched.extend(
            file for file in check.watched_files if file not in watched
        )
        if spec is None:
            rejected[name] = tuple(check.issues)
        else:
            specs[name] = spec

    return LoadedConfig(
        path=path,
        specs=specs,
        rejected=rejected,
        content_hash=hashlib.sha256(data).hexdigest(),
        watched_files=tuple(watched),
    )


def validate_section(
    name: str,
    values: Mapping[str, str],
    *,
    path: str = "<data>",
    lines: Mapping[str, int] | None = None,
    base_dir: str | None = None,
    environ: Mapping[str, str] | None = None,
    credentials_dir: str | None = None,
) -> DatabaseSpec:
    """Return the spec for one section given as ``{key: value}`` text.

    Keys are case-insensitive.  Relative paths resolve against
    ``base_dir`` (default: the current folder).  Raise ``ConfigError``
    with every issue when the section is invalid.
    """
    folded = {key.lower(): value for key, value in values.items()}
    check = _SectionCheck(
        name,
        folded,
        path=path,
        header_line=None,
        lines={key.lower(): line for key, line in (lines or {}).items()},
        inherited=set(),
        base_dir=base_dir if base_dir is not None else os.getcwd(),
        environ=environ,
        credentials_dir=credentials_dir,
    )
    spec = check.run()
    if spec is None:
        raise ConfigError(check.issues)
    return spec


def _base_dir(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def _file_error(path: str, message: str) -> ConfigError:
    return ConfigError([ConfigIssue(path, None, None, None, message)])


def _too_large(size: int) -> str:
    return (
        f"is {size} bytes; the limit is {MAX_CONFIG_BYTES} bytes (4 MiB), "
        "far more than any list of databases needs"
    )


def _read_bytes(path: str) -> bytes:
    try:
        # stat first: opening a FIFO for reading would block.
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise _file_error(path, "is a folder, not a file")
        if not stat.S_ISREG(mode):
            raise _file_error(path, "is not a regular file")
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise _file_error(path, "does not exist") from None
    except PermissionError:
        raise _file_error(
            path, "cannot be read by this user (permission denied)"
        ) from None
    except OSError as error:
        raise _file_error(
            path, f"cannot be read: {error.strerror or error}"
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        size = max(len(data), os.stat(path).st_size)
        raise _file_error(path, _too_large(size))
    return data


def _inline_comment_hint(value: str) -> str:
    if ";" in value or "#" in value:
        return (
            " (comments after a value are not supported: a ';' or '#' "
            "is part of the value; put comments on their own line)"
        )
    return ""


def _split_list(value: str) -> tuple[str, ...]:
    items = (item.strip() for item in re.split(r"[,\n]", value))
    return tuple(item for item in items if item)


class _SectionCheck:
    """Validate one section, collecting every issue instead of stopping."""

    def __init__(
        self,
        name: str,
        values: Mapping[str, str],
        *,
        path: str,
        header_line: int | None,
        lines: Mapping[str, int],
        inherited: set[str],
        base_dir: str,
        environ: Mapping[str, str] | None,
        credentials_dir: str | None,
    ) -> None:
        self.name = name
        self.raw = dict(values)
        self.path = path
        self.header_line = header_line
        self.lines = lines
        self.inherited = inherited
        self.base_dir = base_dir
        self.environ = os.environ if environ is None else environ
        self.credentials_dir = (
            credentials_dir
            if credentials_dir is not None
            else self.environ.get(CREDENTIALS_ENV)
        )
        self.issues: list[ConfigIssue] = []
        self.watched_files: list[str] = []
        self.values: dict[str, str] = {}
        self._secrets: set[str] = set()
        self._broken: set[str] = set()

    def run(self) -> DatabaseSpec | None:
        """Return the spec, or ``None`` with ``self.issues`` filled in."""
        # A literal password is a secret before anything is said; one
        # with a ${NAME} reference becomes one once expanded.
        raw_password = self.raw.get("password", "").strip()
        if "${" not in raw_password:
            self._secret(raw_password)
        self._check_name()
        self._check_keys()
        self._drop_shadowed_defaults()
        self._expand()
        password = self._password()
        url = self._url(password)
        engine = self._engine_options()
        schedule = self._schedule()
        reflection = ReflectionScope(
            **{key: _split_list(self.get(key) or "") for key in _LIST_KEYS}
        )
        self._mask_issues()
        if self.issues or url is None:
            return None
        password_file = self.get("password_file")
        return DatabaseSpec(
            name=self.name,
            url=url,
            engine=engine,
            schedule=schedule,
            reflection=reflection,
            password_file=(
                resolve_path(password_file, base_dir=self.base_dir)
                if password_file
                else None
            ),
        )

    # -- helpers -----------------------------------------------------------

    def get(self, key: str) -> str | None:
        """Return the expanded value of ``key``, ``None`` if unset or bad."""
        value = self.values.get(key)
        return value if value and key not in self._broken else None

    def is_set(self, key: str) -> bool:
        """Tell whether ``key`` is given a non-empty value at all."""
        return bool(self.raw.get(key, "").strip())

    def issue(self, key: str | None, message: str) -> None:
        """Record a problem with ``key`` (``None``: the section itself)."""
        line = self.lines.get(key) if key else None
        if line is None:
            line = self.header_line
        if key in self.inherited:
            message += f" (the value comes from [{DEFAULT_SECTION}])"
        self.issues.append(
            ConfigIssue(self.path, self.name, key, line, message)
        )
        if key is not None:
            self._broken.add(key)

    def show(self, value: str) -> str:
        """Quote ``value`` for a message, unless it holds a secret."""
        if any(secret in value for secret in self._secrets):
            return "the value"
        if "\n" in value:
            # An indented line continues the value above it, so a typo
            # of indentation can pull any line in, a password's too.
            return (
                f"the value of {value.count(chr(10)) + 1} lines (an "
                "indented line continues the value above it)"
            )
        return repr(value)

    def _where(self, key: str) -> str:
        line = self.lines.get(key)
        return key if line is None else f"{key} (line {line})"

    def _secret(self, value: str | None) -> None:
        if value:
            self._secrets.add(value)
            remember_secret(value)

    def _drop_shadowed_defaults(self) -> None:
        kind = self.raw.get("source") or self.raw.get("url") or ""
        if kind.strip().lower().startswith("sqlite"):
            # [DEFAULT] may hold server settings for the other sections.
            for key in _SERVER_KEYS:
                if key in self.inherited:
                    self._ignore(key)
        self._prefer_own(*([key] for key in _SECRET_KEYS))
        self._prefer_own(["url"], [*_URL_PARTS, "base"])

    def _prefer_own(self, *groups: list[str]) -> None:
        """Drop inherited keys that a section's own keys stand in for.

        Of alternatives (a url or its parts; one password source or
        another), the one a section sets itself wins over what
        [DEFAULT] gives; only a clash within one level is an error.
        """
        given = [
            [key for key in group if self.is_set(key)] for group in groups
        ]
        own = [
            key
            for group in given
            for key in group
            if key not in self.inherited
        ]
        if not own:
            return
        for group in given:
            if group and all(key in self.inherited for key in group):
                for key in group:
                    self._ignore(key)

    def _ignore(self, key: str) -> None:
        self.raw.pop(key, None)
        self.values.pop(key, None)

    def _mask_issues(self) -> None:
        # show() keeps values with secrets out; this pass is the net for
        # any message built another way.  Tiny secrets would mask plain
        # words, as in dynaconnd.logs.
        secrets = sorted(
            (secret for secret in self._secrets if len(secret) >= 4),
            key=len,
            reverse=True,
        )
        masked = []
        for issue in self.issues:
            message = issue.message
            for secret in secrets:
                message = message.replace(secret, MASK)
            masked.append(dataclasses.replace(issue, message=message))
        self.issues = masked

    # -- the steps -----------------------------------------------------------

    def _check_name(self) -> None:
        name = self.name
        if name == DEFAULT_SECTION:
            self.issue(None, f"[{DEFAULT_SECTION}] is not a database name")
        elif not name.strip() or name != name.strip():
            self.issue(
                None,
                "a section name must not be blank nor start or end with "
                "spaces",
            )
        elif any(unicodedata.category(char) == "Cc" for char in name):
            self.issue(None, "a section name must not hold control characters")

    def _check_keys(self) -> None:
        for key in self.raw:
            if key in KNOWN_KEYS:
                continue
            if key.startswith(_QUERY_PREFIX):
                if not key.removeprefix(_QUERY_PREFIX):
                    self.issue(
                        key,
                        "a query key needs a parameter name, such as "
                        "query.sslmode",
                    )
                continue
            candidates = [*sorted(KNOWN_KEYS), "query.<name>"]
            close = difflib.get_close_matches(key, candidates, n=1)
            if key == "query":
                close = ["query.<name>"]
            hint = (
                f"did you mean {close[0]!r}?"
                if close
                else "known keys are " + ", ".join(candidates)
            )
            self.issue(key, f"unknown key {self.show(key)}; {hint}")

    def _expand(self) -> None:
        for key, raw in self.raw.items():
            if key in self._broken:
                continue
            if "\n" in raw.strip() and key not in _LIST_KEYS:
                # Never echoed: the lines pulled in may be anything.
                self.issue(
                    key,
                    f"spans {raw.strip().count(chr(10)) + 1} lines (an "
                    "indented line continues the value above it); only "
                    f"{', '.join(_LIST_KEYS)} may span lines",
                )
                continue
            try:
                value = expand_references(raw, self.environ)
            except SecretError as error:
                self.issue(key, str(error))
                continue
            if key == "password":
                self._secret(value)
            self.values[key] = value
        url = self.values.get("url")
        if url:
            with contextlib.suppress(sa_exc.ArgumentError, ValueError):
                self._secret(make_url(url).password)

    def _password(self) -> str | None:
        given = [key for key in _SECRET_KEYS if self.is_set(key)]
        if len(given) > 1:
            where = " and ".join(self._where(key) for key in given)
            self.issue(
                given[-1],
                f"sets {where}; give only one of password, password_file "
                "and password_credential",
            )
            return None

        file = self.get("password_file")
        if file is not None:
            self.watched_files.append(
                resolve_path(file, base_dir=self.base_dir)
            )
            return self._read_secret(
                "password_file",
                lambda: read_password_file(file, base_dir=self.base_dir),
            )
        credential = self.get("password_credential")
        if credential is not None:
            return self._read_secret(
                "password_credential",
                lambda: read_credential(
                    credential, credentials_dir=self.credentials_dir
                ),
            )
        return self.get("password")

    def _read_secret(self, key: str, read: Callable[[], str]) -> str | None:
        try:
            secret = read()
        except SecretError as error:
            self.issue(key, str(error))
            return None
        self._secret(secret)
        return secret

    def _url(self, password: str | None) -> URL | None:
        url: URL | None
        if self.is_set("url"):
            parts = [key for key in (*_URL_PARTS, "base") if self.is_set(key)]
            if parts:
                where = ", ".join(self._where(key) for key in parts)
                self.issue(
                    "url",
                    f"cannot be combined with {where}; give either url "
                    "alone or source, username, password, host, port and "
                    "base",
                )
                return None
            url = self._url_from_text(password)
        elif self.is_set("source"):
            url = self._url_from_parts(password)
        else:
            self.issue(
                "source",
                "is missing; set source to one of "
                + ", ".join(KNOWN_SOURCES)
                + " (or a dialect+driver), or give a url",
            )
            return None
        if url is None:
            return None

        query = {
            key.removeprefix(_QUERY_PREFIX): value
            for key, value in self.values.items()
            if key.startswith(_QUERY_PREFIX) and key not in self._broken
        }
        for name in query:
            if name in url.query:
                self.issue(
                    _QUERY_PREFIX + name,
                    f"the url already sets the query parameter {name!r}; "
                    "set it in one place only",
                )
        if query:
            url = url.update_query_dict(query)

        if url.get_backend_name() == "sqlite" and url.database:
            url = url.set(database=self._sqlite_path(url.database))
        return url

    def _url_from_text(self, password: str | None) -> URL | None:
        text = self.get("url")
        if text is None:
            return None
        try:
            url = make_url(text)
        except (sa_exc.ArgumentError, ValueError):
            # SQLAlchemy's own message may quote the URL and its password.
            self.issue(
                "url", f"is not a SQLAlchemy URL; expected {_URL_SHAPE}"
            )
            return None
        if url.port is not None and not 1 <= url.port <= 65535:
            self.issue(
                "url", f"has port {url.port}; expected a port from 1 to 65535"
            )
        if password is not None:
            if url.password is not None:
                self.issue(
                    "url",
                    "already holds a password; remove it from the url or "
                    "drop password_file/password_credential",
                )
            url = url.set(password=password)

        drivername = self._drivername("url", url.drivername, None)
        if drivername is None:
            return None
        return url.set(drivername=drivername)

    def _url_from_parts(self, password: str | None) -> URL | None:
        source = (self.get("source") or "").strip().lower()
        driver = (self.get("driver") or "").strip().lower() or None
        port = self._parse("port", self._port)
        drivername = self._drivername("source", source, driver)
        username = self.get("username")
        host = self.get("host")
        base = self.get("base")

        if drivername is not None and drivername.startswith("sqlite"):
            for key in _SERVER_KEYS:
                if self.is_set(key):
                    self.issue(
                        key,
                        "does not apply to sqlite, whose only setting is "
                        "base (the database file); remove it",
                    )
            if not self.is_set("base"):
                self.issue(
                    "base",
                    "is missing; sqlite needs base = the database file, "
                    "absolute or relative to the folder of source.ini",
                )
        if drivername is None or self.issues:
            return None
        return URL.create(
            drivername,
            username=username,
            password=password,
            host=host,
            port=port,
            database=base,
        )

    def _sqlite_path(self, database: str) -> str:
        if database == ":memory:" or database.startswith("file:"):
            return database
        if database.startswith("~"):
            key = "url" if self.is_set("url") else "base"
            self.issue(
                key,
                "starts with '~', which is not expanded; give an absolute "
                "path or one relative to the folder of source.ini",
            )
            return database
        return resolve_path(database, base_dir=self.base_dir)

    def _drivername(
        self, key: str, written: str, driver: str | None
    ) -> str | None:
        dialect, plus, named = written.partition("+")
        if not _DRIVERNAME.fullmatch(written):
            self._unknown_dialect(key, written)
            return None
        if driver is not None:
            if plus and named != driver:
                self.issue(
                    "driver",
                    f"is {self.show(driver)} but source names the driver "
                    f"{named!r}; set the driver in one place",
                )
                return None
            named = driver
        named = named or DEFAULT_DRIVERS.get(dialect, "")
        if dialect == "sqlite" and named == "pysqlite" and not plus:
            # Plain "sqlite" is the pysqlite driver; keep the short form.
            drivername = "sqlite"
        else:
            drivername = f"{dialect}+{named}" if named else dialect
        problem = _driver_problem(dialect, named, drivername)
        if problem == "dialect":
            self._unknown_dialect(key, dialect)
            return None
        if problem is not None:
            self.issue("driver" if driver else key, problem)
            return None
        return drivername

    def _unknown_dialect(self, key: str, written: str) -> None:
        close = difflib.get_close_matches(written, KNOWN_SOURCES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        self.issue(
            key,
            f"names the unknown database kind {self.show(written)}; "
            f"{hint}known kinds are {', '.join(KNOWN_SOURCES)}, or a "
            "dialect+driver SQLAlchemy can load such as postgresql+psycopg",
        )

    def _parse(self, key: str, parse: Callable[[str, str], _T]) -> _T | None:
        value = self.get(key)
        if value is None:
            return None
        try:
            return parse(key, value.strip())
        except ValueError as error:
            self.issue(key, f"{error}{_inline_comment_hint(value)}")
            return None

    def _port(self, key: str, value: str) -> int:
        if value.isascii() and value.isdigit() and 1 <= int(value) <= 65535:
            return int(value)
        raise ValueError(
            f"{self.show(value)} is not a port; expected a whole number "
            "from 1 to 65535"
        )

    def _int(self, key: str, value: str) -> int:
        lowest = _INT_KEYS[key]
        text = value.removeprefix("-")
        if text.isascii() and text.isdigit() and int(value) >= lowest:
            return int(value)
        raise ValueError(
            f"{self.show(value)} is not a whole number of at least {lowest}"
        )

    def _duration(self, key: str, value: str) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError:
            if self.show(value) == repr(value):
                raise
            raise ValueError(
                "is not a duration; expected seconds such as 2.5, or a "
                "number with a unit: 500ms, 30s, 5m, 1h"
            ) from None
        if seconds <= 0:
            raise ValueError(
                f"{self.show(value)} is not a duration above zero"
            )
        return seconds

    def _bool(self, key: str, value: str) -> bool:
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ValueError(
            f"{self.show(value)} is not a boolean; expected one of true, "
            "false, yes, no, on, off, 1, 0"
        )

    def _engine_options(self) -> EngineOptions:
        defaults = EngineOptions()
        ints = {key: self._parse(key, self._int) for key in _INT_KEYS}
        durations = {
            key: self._parse(key, self._duration)
            for key in ("pool_recycle", "pool_timeout", "connect_timeout")
        }
        bools = {key: self._parse(key, self._bool) for key in _BOOL_KEYS}
        return EngineOptions(
            pool_size=ints["pool_size"],
            max_overflow=ints["max_overflow"],
            pool_recycle=durations["pool_recycle"],
            pool_timeout=durations["pool_timeout"],
            connect_timeout=durations["connect_timeout"],
            pool_pre_ping=_or(bools["pool_pre_ping"], defaults.pool_pre_ping),
            echo=_or(bools["echo"], defaults.echo),
        )

    def _schedule(self) -> Schedule:
        defaults = Schedule()
        return Schedule(
            health_interval=_or(
                self._parse("health_interval", self._duration),
                defaults.health_interval,
            ),
            health_timeout=_or(
                self._parse("health_timeout", self._duration),
                defaults.health_timeout,
            ),
            reflect_interval=_or(
                self._parse("reflect_interval", self._duration),
                defaults.reflect_interval,
            ),
        )


def _or(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def _driver_problem(dialect: str, driver: str, drivername: str) -> str | None:
    """Return why ``drivername`` cannot be used, ``"dialect"`` if unknown."""
    if drivername in _loadable:
        return None
    try:
        URL.create(dialect).get_dialect()
    except sa_exc.NoSuchModuleError:
        return "dialect"
    try:
        dialect_class = URL.create(drivername).get_dialect()
    except sa_exc.NoSuchModuleError:
        known = _DRIVERS.get(dialect)
        listing = (
            f"known drivers for {dialect} are {', '.join(known)}"
            if known
            else "see SQLAlchemy's list of dialects and drivers"
        )
        return f"names the unknown driver {driver!r}; {listing}"

    if getattr(dialect_class, "is_async", False):
        default = DEFAULT_DRIVERS.get(dialect)
        hint = f"; use {dialect}+{default}" if default else ""
        return (
            f"{drivername} is an asyncio driver, and dynaconn builds "
            f"synchronous engines{hint}"
        )
    try:
        dialect_class.import_dbapi()
    except ImportError as error:
        return _missing_driver(dialect, driver, drivername, error)
    _loadable.add(drivername)
    return None


def _missing_driver(
    dialect: str, driver: str, drivername: str, error: ImportError
) -> str:
    module = error.name or driver
    extra = _EXTRAS.get(dialect)
    default = DEFAULT_DRIVERS.get(dialect)
    message = (
        f"needs the Python module {module!r} for {drivername}, which is "
        "not installed; "
    )
    if extra and driver == default:
        return message + f"pip install 'magenta-dynaconn[{extra}]'"
    package = _PIP_NAMES.get(driver, module)
    message += f"pip install {package}"
    if extra and default:
        message += (
            f", or use the default driver {dialect}+{default} "
            f"(pip install 'magenta-dynaconn[{extra}]')"
        )
    return message
