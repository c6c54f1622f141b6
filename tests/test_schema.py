"""Specifications for reflection into plain data and catalog fingerprints."""

# The house style writes asserts as ``expected == actual``.

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

from dynaconnd import schema
from dynaconnd.spec import ReflectionScope

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import URL

ALL = ReflectionScope()


@pytest.fixture
def engine(db_url: URL) -> Iterator[sa.Engine]:
    """Yield an engine on an empty database of each backend."""
    engine = sa.create_engine(db_url)
    yield engine
    engine.dispose()


def create_shop(engine: sa.Engine) -> None:
    """Create customer, orders (FK to customer), audit_log and a view."""
    metadata = sa.MetaData()
    sa.Table(
        "customer",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(80), nullable=False),
        sa.Column("score", sa.Numeric(10, 2)),
        sa.Column("joined", sa.DateTime, server_default=sa.func.now()),
    )
    sa.Table(
        "orders",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("customer_id", sa.ForeignKey("customer.id")),
        sa.Column("note", sa.Text),
    )
    sa.Table(
        "audit_log",
        metadata,
        sa.Column("ts", sa.String(40)),
        sa.Column("msg", sa.String(200)),
    )
    metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            sa.text("CREATE VIEW customer_names AS SELECT name FROM customer")
        )


def test_list_tables_returns_tables_and_views(engine: sa.Engine) -> None:
    """Tables and views of the default schema are listed, sorted."""
    create_shop(engine)

    assert ["audit_log", "customer", "customer_names", "orders"] == (
        schema.list_tables(engine, ALL)
    )


def test_list_tables_honours_include_and_exclude(engine: sa.Engine) -> None:
    """fnmatch include and exclude patterns select the tables."""
    create_shop(engine)
    scope = ReflectionScope(
        include_tables=("customer*", "orders"),
        exclude_tables=("*_names",),
    )

    assert ["customer", "orders"] == schema.list_tables(engine, scope)


def test_description_is_plain_data(engine: sa.Engine) -> None:
    """A description survives json.dumps and loads unchanged."""
    create_shop(engine)
    tables = schema.reflect_tables(engine, ALL)

    assert tables == json.loads(json.dumps(tables))


def test_description_records_keys_types_and_view(engine: sa.Engine) -> None:
    """Columns, primary key, foreign keys and the view flag are recorded."""
    create_shop(engine)
    tables = schema.reflect_tables(engine, ALL)
    orders = tables["orders"]
    customer = {c["name"]: c for c in tables["customer"]["columns"]}

    assert (["id"], False) == (orders["primary_key"], orders["is_view"])
    assert [
        {
            "columns": ["customer_id"],
            "referred_schema": None,
            "referred_table": "customer",
            "referred_columns": ["id"],
        }
    ] == [
        {key: value for key, value in fk.items() if key != "name"}
        for fk in orders["foreign_keys"]
    ]
    assert {"name": "String", "args": {"length": 80}} == {
        key: customer["name"]["type"][key] for key in ("name", "args")
    }
    assert {"precision": 10, "scale": 2} == customer["score"]["type"]["args"]
    assert (False, True) == (
        customer["name"]["nullable"],
        customer["id"]["primary_key"],
    )
    assert customer["joined"]["default"] is not None
    assert (True, []) == (
        tables["customer_names"]["is_view"],
        tables["customer_names"]["primary_key"],
    )
    assert [] == tables["audit_log"]["primary_key"]


def test_describe_table_matches_reflect_tables(engine: sa.Engine) -> None:
    """The one-table and the many-table paths give the same description."""
    create_shop(engine)
    tables = schema.reflect_tables(engine, ALL)

    with engine.connect() as connection:
        inspector = sa.inspect(connection)
        described = {
            name: schema.describe_table(inspector, name, None)
            for name in tables
        }

    assert tables == described


def test_rebuilt_table_inserts_and_selects(engine: sa.Engine) -> None:
    """A Table rebuilt from JSON round-tripped descriptions does DML."""
    create_shop(engine)
    tables = json.loads(json.dumps(schema.reflect_tables(engine, ALL)))
    metadata = sa.MetaData()
    customer = schema.table_from_description(tables["customer"], metadata)
    orders = schema.table_from_description(tables["orders"], metadata)

    with engine.begin() as connection:
        connection.execute(customer.insert().values(name="Ada", score=1.5))
        customer_id = connection.execute(
            sa.select(customer.c.id).where(customer.c.name == "Ada")
        ).scalar_one()
        connection.execute(orders.insert().values(customer_id=customer_id))
        rows = connection.execute(
            sa.select(customer.c.name, orders.c.customer_id).join(orders)
        ).all()

    assert [("Ada", customer_id)] == [tuple(row) for row in rows]


def test_reflect_tables_skips_names_out_of_scope(engine: sa.Engine) -> None:
    """Asking for excluded or missing tables leaves them out."""
    create_shop(engine)
    scope = ReflectionScope(exclude_tables=("audit_log",))

    assert ["customer"] == list(
        schema.reflect_tables(
            engine, scope, ["customer", "audit_log", "missing"]
        )
    )


@pytest.mark.parametrize(
    "change",
    [
        "ALTER TABLE customer ADD COLUMN email VARCHAR(100)",
        "CREATE TABLE extra (id INTEGER PRIMARY KEY)",
        "DROP TABLE audit_log",
    ],
)
def test_fingerprint_changes_with_the_catalog(
    engine: sa.Engine, change: str
) -> None:
    """Adding a column, creating or dropping a table changes it."""
    create_shop(engine)
    before = schema.fingerprint(engine, ALL)

    with engine.begin() as connection:
        connection.execute(sa.text(change))

    assert before != schema.fingerprint(engine, ALL)


def test_fingerprint_is_stable_across_data_changes(engine: sa.Engine) -> None:
    """Rows and new connections leave the fingerprint unchanged."""
    create_shop(engine)
    before = schema.fingerprint(engine, ALL)

    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO customer (name) VALUES ('Ada')")
        )
    engine.dispose()

    with engine.connect() as connection:
        assert before == schema.fingerprint(connection, ALL)


def test_fingerprint_ignores_tables_out_of_scope(engine: sa.Engine) -> None:
    """A change to an excluded table leaves the fingerprint unchanged."""
    create_shop(engine)
    scope = ReflectionScope(exclude_tables=("audit_log",))
    before = schema.fingerprint(engine, scope)

    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE audit_log"))

    assert before == schema.fingerprint(engine, scope)


def test_diff_schemas_after_real_changes(engine: sa.Engine) -> None:
    """A real ALTER, CREATE and DROP show up in the diff."""
    create_shop(engine)
    old = schema.reflect_tables(engine, ALL)

    with engine.begin() as connection:
        connection.execute(
            sa.text("ALTER TABLE customer ADD COLUMN email VARCHAR(100)")
        )
        connection.execute(sa.text("CREATE TABLE extra (id INTEGER)"))
        connection.execute(sa.text("DROP TABLE audit_log"))
    new = schema.reflect_tables(engine, ALL)

    assert {
        "tables_added": ["extra"],
        "tables_removed": ["audit_log"],
        "tables_altered": {
            "customer": {
                "columns_added": ["email"],
                "columns_removed": [],
                "columns_altered": [],
                "altered": [],
            }
        },
    } == schema.diff_schemas(old, new)


def column(name: str, type_name: str = "Integer", **extra: Any) -> Any:
    """Return a column description with the usual defaults."""
    return {
        "name": name,
        "type": {"name": type_name, "args": {}, "native": type_name},
        "nullable": True,
        "default": None,
        "autoincrement": "auto",
        "primary_key": False,
        "computed": None,
        "identity": False,
        **extra,
    }


def table(name: str, *columns: Any, primary_key: Any = ()) -> Any:
    """Return a table description."""
    return {
        "name": name,
        "schema": None,
        "columns": list(columns),
        "primary_key": list(primary_key),
        "foreign_keys": [],
        "is_view": False,
    }


def test_diff_schemas_reports_each_kind_of_change() -> None:
    """Columns added, removed and altered, and keys, are each reported."""
    old = {
        "a": table("a", column("id"), column("x"), column("y")),
        "gone": table("gone", column("id")),
    }
    new = {
        "a": table(
            "a",
            column("id"),
            column("x", "String"),
            column("z"),
            primary_key=["id"],
        ),
        "fresh": table("fresh", column("id")),
    }

    assert {
        "tables_added": ["fresh"],
        "tables_removed": ["gone"],
        "tables_altered": {
            "a": {
                "columns_added": ["z"],
                "columns_removed": ["y"],
                "columns_altered": ["x"],
                "altered": ["primary_key"],
            }
        },
    } == schema.diff_schemas(old, new)


def test_diff_schemas_of_equal_schemas_is_empty() -> None:
    """Nothing changed means empty lists and no altered table."""
    tables = {"a": table("a", column("id"))}

    assert {
        "tables_added": [],
        "tables_removed": [],
        "tables_altered": {},
    } == schema.diff_schemas(tables, json.loads(json.dumps(tables)))


def test_unknown_type_name_rebuilds_as_null_type() -> None:
    """A type this SQLAlchemy does not know becomes NullType."""
    description = table(
        "t", column("id"), column("ip", "INETLIKE"), primary_key=["id"]
    )

    rebuilt = schema.table_from_description(description, sa.MetaData())

    assert isinstance(rebuilt.c.ip.type, sa.types.NullType)


def test_postgresql_types_without_generic_form(pg_url: URL) -> None:
    """INET keeps its native name and rebuilds as NullType; arrays nest."""
    engine = sa.create_engine(pg_url)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "CREATE TABLE hosts (id SERIAL PRIMARY KEY, ip INET, "
                "ports INTEGER[], seen TIMESTAMPTZ)"
            )
        )
    columns = {
        c["name"]: c["type"]
        for c in schema.reflect_tables(engine, ALL)["hosts"]["columns"]
    }
    engine.dispose()

    assert {"name": "NullType", "args": {}, "native": "INET"} == columns["ip"]
    assert "Integer" == columns["ports"]["args"]["item_type"]["name"]
    assert {"timezone": True} == columns["seen"]["args"]


def test_postgresql_schema_qualified_names(pg_url: URL) -> None:
    """Tables outside the default schema are named schema.table."""
    engine = sa.create_engine(pg_url)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE SCHEMA sales"))
        connection.execute(
            sa.text("CREATE TABLE sales.customer (id SERIAL PRIMARY KEY)")
        )
        connection.execute(
            sa.text(
                "CREATE TABLE sales.orders (id SERIAL PRIMARY KEY, "
                "customer_id INTEGER REFERENCES sales.customer (id))"
            )
        )
        connection.execute(
            sa.text("CREATE TABLE plain (id SERIAL PRIMARY KEY)")
        )
    scope = ReflectionScope(schemas=("public", "sales"))

    names = schema.list_tables(engine, scope)
    orders = schema.reflect_tables(engine, scope, ["sales.orders"])
    default_only = schema.list_tables(engine, ALL)
    engine.dispose()

    assert ["plain", "sales.customer", "sales.orders"] == names
    assert ["plain"] == default_only
    assert ("orders", "sales", "sales") == (
        orders["sales.orders"]["name"],
        orders["sales.orders"]["schema"],
        orders["sales.orders"]["foreign_keys"][0]["referred_schema"],
    )
