"""Tests for dynaconnd.protocol: wire forms and the version handshake."""

from __future__ import annotations

import json
import pickle

import pytest
from sqlalchemy.engine import URL

from dynaconnd import errors
from dynaconnd.protocol import (
    PROTOCOL_VERSION,
    SERVICE_METHODS,
    check_protocol,
    spec_from_wire,
    spec_to_wire,
)
from dynaconnd.spec import (
    DatabaseSpec,
    EngineOptions,
    ReflectionScope,
    Schedule,
)

PASSWORD = "p@ss:w/rd#1%7d+x"


def _spec() -> DatabaseSpec:
    return DatabaseSpec(
        name="crm",
        url=URL.create(
            "postgresql+psycopg",
            username="app@user",
            password=PASSWORD,
            host="127.0.0.1",
            port=5432,
            database="crm",
            query={"sslmode": "require", "options": ("-c a=1", "-c b=2")},
        ),
        engine=EngineOptions(pool_size=3, pool_recycle=1.5, echo=True),
        schedule=Schedule(health_interval=5.0),
        reflection=ReflectionScope(
            schemas=("public",), exclude_tables=("audit",)
        ),
        password_file="/run/credentials/crm",
    )


def test_spec_round_trips_through_the_wire_form() -> None:
    """A spec rebuilt from its wire form equals the original."""
    spec = _spec()

    rebuilt = spec_from_wire(spec_to_wire(spec))

    assert spec == rebuilt
    assert PASSWORD == rebuilt.url.password
    assert "app@user" == rebuilt.url.username


def test_wire_form_is_plain_json_data() -> None:
    """The wire form survives JSON, so no SQLAlchemy object is in it."""
    wire = spec_to_wire(_spec())

    assert wire == json.loads(json.dumps(wire))
    assert spec_from_wire(json.loads(json.dumps(wire))) == _spec()


def test_wire_form_carries_the_password_field_by_field() -> None:
    """The password crosses as its own field, never inside a URL text."""
    wire = spec_to_wire(_spec())

    assert PASSWORD == wire["url"]["password"]
    assert "://" not in json.dumps(wire)


def test_sqlite_spec_round_trips() -> None:
    """A spec with no host, user or port round-trips too."""
    spec = DatabaseSpec(
        name="main", url=URL.create("sqlite", database="/tmp/x.db")
    )

    assert spec == spec_from_wire(spec_to_wire(spec))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda wire: wire.pop("url"),
        lambda wire: wire.update(surprise=1),
        lambda wire: wire["engine"].update(pool_sizes=3),
        lambda wire: wire["url"].update(path="/x"),
        lambda wire: wire.update(url="sqlite://"),
    ],
)
def test_malformed_wire_spec_raises_value_error(mutate: object) -> None:
    """Data of the wrong shape is a ValueError that says so."""
    wire = spec_to_wire(_spec())
    mutate(wire)  # type: ignore[operator]

    with pytest.raises(ValueError, match="malformed wire spec"):
        spec_from_wire(wire)


def test_check_protocol_accepts_our_version() -> None:
    """The same version passes silently."""
    check_protocol(PROTOCOL_VERSION, socket_path="/run/dynaconnd/x.sock")


def test_check_protocol_names_both_versions_and_the_socket() -> None:
    """A mismatch says which versions met, and where."""
    with pytest.raises(errors.ProtocolMismatchError) as caught:
        check_protocol(2, socket_path="/run/dynaconnd/x.sock")

    assert (
        "client speaks protocol 1, daemon at /run/dynaconnd/x.sock speaks 2"
    ) == str(caught.value)


def test_service_methods_are_unique_and_sorted() -> None:
    """The shared list of calls has no duplicates and reads in order."""
    assert sorted(set(SERVICE_METHODS)) == list(SERVICE_METHODS)
    assert {"hello", "specs", "table_description"} <= set(SERVICE_METHODS)


@pytest.mark.parametrize(
    "error",
    [
        errors.UnknownDatabaseError("unknown database 'x'; did you mean"),
        errors.UnknownTableError("database 'x' has no table 'y'"),
        errors.ProtocolMismatchError("client speaks protocol 1"),
        errors.RegistryUnavailableError("dynaconnd is not available"),
        errors.NoPrimaryKeyError("table 'audit' has no primary key"),
        errors.WritesDisabledError("start it with --allow-writes"),
        errors.MissingDriverError("pip install psycopg"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_errors_that_cross_the_socket_survive_pickling(
    error: Exception,
) -> None:
    """A service error re-raised in the client keeps its class and text."""
    copy = pickle.loads(pickle.dumps(error))

    assert type(error) is type(copy)
    assert str(error) == str(copy)
