"""Secrets kept out of source.ini: files, systemd credentials, ``${ENV}``.

Every secret read here is handed to :func:`dynaconnd.logs.remember_secret`
at once, so the log redaction net knows it before anything could log it.
Error messages name files and variables, never what they hold.
"""

from __future__ import annotations

import os
import re
import stat
from typing import TYPE_CHECKING

from dynaconnd.errors import DynaconnError
from dynaconnd.logs import get_logger, remember_secret

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "CREDENTIALS_ENV",
    "MAX_SECRET_FILE_BYTES",
    "SecretError",
    "expand_references",
    "read_credential",
    "read_password_file",
    "resolve_path",
]

#: The variable systemd sets to the folder of a unit's credentials.
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"

#: A password file larger than this is certainly not a password file.
MAX_SECRET_FILE_BYTES = 64 * 1024

# Permission bits that let someone other than the owner read the file.
_READABLE_BY_OTHERS = stat.S_IRGRP | stat.S_IROTH

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_log = get_logger("config")


class SecretError(DynaconnError, ValueError):
    """A secret that a section refers to cannot be had.

    The message names the file, credential or variable, never its value.
    """


def expand_references(value: str, environ: Mapping[str, str]) -> str:
    """Return ``value`` with each ``${NAME}`` replaced from ``environ``.

    ``$${`` stands for a literal ``${``; any other ``$`` is kept as it
    is.  Raise ``SecretError`` naming every variable that is not set.
    """
    if "$" not in value:
        return value

    parts: list[str] = []
    missing: list[str] = []
    malformed = 0
    position = 0
    while (dollar := value.find("$", position)) >= 0:
        parts.append(value[position:dollar])
        if value.startswith("$${", dollar):
            parts.append("${")
            position = dollar + 3
            continue
        if not value.startswith("${", dollar):
            parts.append("$")
            position = dollar + 1
            continue

        close = value.find("}", dollar + 2)
        name = value[dollar + 2 : close] if close >= 0 else ""
        if close < 0 or not _NAME.fullmatch(name):
            # Whatever follows may be part of a password: never echo it.
            malformed += 1
            parts.append("${")
            position = dollar + 2
            continue
        if name in environ:
            parts.append(environ[name])
        elif name not in missing:
            missing.append(name)
        position = close + 1
    parts.append(value[position:])

    problems = []
    if missing:
        names = ", ".join(f"${{{name}}}" for name in missing)
        noun = "variable" if len(missing) == 1 else "variables"
        problems.append(f"refers to the environment {noun} {names}, not set")
    if malformed:
        problems.append(
            "has a '${' that does not start a reference such as "
            "${NAME} (letters, digits and _); write '$${' for a "
            "literal '${'"
        )
    if problems:
        raise SecretError("; ".join(problems))
    return "".join(parts)


def resolve_path(path: str, *, base_dir: str) -> str:
    """Return ``path`` made absolute against ``base_dir`` and normalised."""
    return os.path.normpath(os.path.join(base_dir, path))


def read_password_file(path: str, *, base_dir: str) -> str:
    """Return the first line of the password file at ``path``.

    A relative ``path`` is taken from ``base_dir`` (the folder of
    source.ini).  A file that group or others may read is still used, and
    logged as ``config.insecure_secret_file``.
    """
    full = resolve_path(path, base_dir=base_dir)
    return _read_first_line(full, f"password file {full}", check_mode=True)


def read_credential(name: str, *, credentials_dir: str | None) -> str:
    """Return the systemd credential ``name`` from ``credentials_dir``.

    systemd passes credentials (``LoadCredential=``,
    ``SetCredentialEncrypted=``) as files in ``$CREDENTIALS_DIRECTORY``.
    """
    if not credentials_dir:
        raise SecretError(
            f"needs ${CREDENTIALS_ENV}, which is not set; systemd sets it "
            "for a unit with LoadCredential= or SetCredentialEncrypted="
        )
    if name in {"", ".", ".."} or "/" in name or "\x00" in name:
        raise SecretError(
            "is not a credential name; give the bare name used in "
            "LoadCredential=NAME:..., without a folder"
        )
    full = os.path.join(credentials_dir, name)
    return _read_first_line(full, f"credential {name!r} ({full})")


def _read_first_line(full: str, what: str, *, check_mode: bool = False) -> str:
    try:
        with open(full, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise SecretError(f"{what} is not a regular file")
            data = handle.read(MAX_SECRET_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SecretError(f"{what} does not exist") from None
    except IsADirectoryError:
        raise SecretError(f"{what} is a folder, not a file") from None
    except PermissionError:
        raise SecretError(
            f"{what} cannot be read by this user (permission denied)"
        ) from None
    except OSError as error:
        raise SecretError(f"{what} cannot be read: {error.strerror}") from None

    if len(data) > MAX_SECRET_FILE_BYTES:
        raise SecretError(
            f"{what} is larger than {MAX_SECRET_FILE_BYTES} bytes; it "
            "should hold the password on its first line"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SecretError(f"{what} is not UTF-8 text") from None
    secret = text.split("\n", 1)[0].removesuffix("\r")
    if not secret:
        raise SecretError(
            f"{what} has an empty first line; the password is its first line"
        )
    remember_secret(secret)

    if check_mode and mode & _READABLE_BY_OTHERS:
        _log.warning(
            "config.insecure_secret_file",
            path=full,
            mode=format(stat.S_IMODE(mode), "04o"),
            hint="chmod 600 the file, or use password_credential",
        )
    return secret
