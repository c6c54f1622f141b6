"""What the daemon and its clients say to each other, as plain values.

Everything that crosses the socket is ``str``, ``int``, ``float``,
``bool``, ``None``, lists and dicts: a client may run another
SQLAlchemy release than the daemon, and pickled SQLAlchemy objects do
not load across releases.  A spec crosses with its password, because
whoever holds the authkey is trusted as the daemon's own user; neither
side ever logs it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy.engine import URL

from dynaconnd.errors import ProtocolMismatchError
from dynaconnd.spec import (
    DatabaseSpec,
    EngineOptions,
    ReflectionScope,
    Schedule,
)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "SERVICE_IDENT",
    "SERVICE_METHODS",
    "check_protocol",
    "spec_from_wire",
    "spec_to_wire",
]

#: Raised whenever a call changes meaning or a wire form changes shape.
PROTOCOL_VERSION = 1

#: The fixed id the service object has on the manager server; clients
#: address their calls to it without creating a shared object first.
SERVICE_IDENT = "dynaconn"

#: The largest request or reply either side accepts, in bytes.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024

#: The calls the daemon's service object answers, shared by both sides.
SERVICE_METHODS = (
    "add_instance",
    "check",
    "connection_spec",
    "describe",
    "epoch",
    "generation",
    "health",
    "hello",
    "last_outcome",
    "names",
    "ping",
    "reload",
    "remove_instance",
    "schema_generation",
    "specs",
    "table_description",
    "tables",
    "update_instance",
)

_URL_KEYS = (
    "drivername",
    "username",
    "password",
    "host",
    "port",
    "database",
    "query",
)
_SPEC_KEYS = frozenset(
    {"name", "url", "engine", "schedule", "reflection", "password_file"}
)


def _query_to_wire(url: URL) -> dict[str, str | list[str]]:
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in url.query.items()
    }


def spec_to_wire(spec: DatabaseSpec) -> dict[str, Any]:
    """Return ``spec`` as plain values, password included."""
    url = spec.url
    return {
        "name": spec.name,
        "url": {
            "drivername": url.drivername,
            "username": url.username,
            "password": url.password,
            "host": url.host,
            "port": url.port,
            "database": url.database,
            "query": _query_to_wire(url),
        },
        "engine": dataclasses.asdict(spec.engine),
        "schedule": dataclasses.asdict(spec.schedule),
        "reflection": {
            key: list(value)
            for key, value in dataclasses.asdict(spec.reflection).items()
        },
        "password_file": spec.password_file,
    }


def _malformed(what: str) -> ValueError:
    return ValueError(f"malformed wire spec: {what}")


def _mapping(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _malformed(f"{what} is {type(data).__name__}, not a dict")
    return data


def _url_from_wire(data: dict[str, Any]) -> URL:
    unknown = sorted(set(data) - set(_URL_KEYS))
    if unknown:
        raise _malformed(f"unknown URL keys {unknown}")
    query = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in _mapping(data.get("query", {}), "query").items()
    }
    # URL.create, not text: a password with URL characters stays intact.
    return URL.create(
        data["drivername"],
        username=data.get("username"),
        password=data.get("password"),
        host=data.get("host"),
        port=data.get("port"),
        database=data.get("database"),
        query=query,
    )


def spec_from_wire(data: dict[str, Any]) -> DatabaseSpec:
    """Rebuild the ``DatabaseSpec`` that :func:`spec_to_wire` described.

    Raises ``ValueError`` for data of the wrong shape.
    """
    data = _mapping(data, "spec")
    unknown = sorted(set(data) - _SPEC_KEYS)
    if unknown:
        raise _malformed(f"unknown keys {unknown}")
    try:
        return DatabaseSpec(
            name=data["name"],
            url=_url_from_wire(_mapping(data["url"], "url")),
            engine=EngineOptions(**_mapping(data["engine"], "engine")),
            schedule=Schedule(**_mapping(data["schedule"], "schedule")),
            reflection=ReflectionScope(
                **{
                    key: tuple(value)
                    for key, value in _mapping(
                        data["reflection"], "reflection"
                    ).items()
                }
            ),
            password_file=data.get("password_file"),
        )
    except KeyError as error:
        raise _malformed(f"missing key {error}") from None
    except TypeError as error:
        # An unexpected keyword for one of the dataclasses.
        raise _malformed(str(error)) from None


def check_protocol(
    server_version: object, *, socket_path: str | None = None
) -> None:
    """Raise ``ProtocolMismatchError`` unless the daemon speaks ours."""
    if server_version != PROTOCOL_VERSION:
        where = f" at {socket_path}" if socket_path else ""
        raise ProtocolMismatchError(
            f"client speaks protocol {PROTOCOL_VERSION}, daemon{where}"
            f" speaks {server_version!r}"
        )
