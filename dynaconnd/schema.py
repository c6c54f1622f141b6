"""Reflection into plain-data table descriptions, and catalog fingerprints.

A description is made of str, int, float, bool, None, lists and dicts
only, so it survives ``json.dumps`` and any SQLAlchemy release on the
other side of the socket::

    {"name": "orders", "schema": "sales", "is_view": False,
     "columns": [{"name": "id",
                  "type": {"name": "Integer", "args": {},
                           "native": "INTEGER"},
                  "nullable": False, "default": None,
                  "autoincrement": True, "primary_key": True,
                  "computed": None, "identity": False}, ...],
     "primary_key": ["id"],
     "foreign_keys": [{"name": "orders_customer_id_fkey",
                       "columns": ["customer_id"],
                       "referred_schema": "sales",
                       "referred_table": "customer",
                       "referred_columns": ["id"]}]}

``schema`` and ``referred_schema`` are ``None`` for the connection's
default schema.  A table outside it is named ``"schema.table"``.

Column types are recorded in their generic form (``String``, ``Numeric``,
``DateTime``...) with the constructor arguments that differ from the
defaults; a type with no generic form keeps only its dialect name in
``native`` and is rebuilt as ``NullType``.

Reflection scope: with no ``schemas`` only the default schema is read.
``include_tables`` and ``exclude_tables`` are ``fnmatch`` patterns,
case-sensitive, matched against both the qualified name
(``sales.orders``) and the bare one (``orders``); a table is kept when
it matches an include pattern (or there are none) and no exclude one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import inspect as pyinspect
import json
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import types as satypes
from sqlalchemy.engine.reflection import ObjectKind

from dynaconnd.logs import get_logger

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from sqlalchemy.engine import Connection, Dialect, Engine
    from sqlalchemy.engine.reflection import Inspector

    from dynaconnd.spec import ReflectionScope

__all__ = [
    "describe_table",
    "diff_schemas",
    "fingerprint",
    "list_tables",
    "qualified_name",
    "reflect_tables",
    "table_from_description",
]

_log = get_logger("schema")

_PLAIN_SCALARS = (str, int, float, bool)


def qualified_name(table: str, schema: str | None) -> str:
    """Return ``table``, or ``schema.table`` outside the default schema."""
    return table if schema is None else f"{schema}.{table}"


@contextlib.contextmanager
def _inspector(bind: Connection | Engine) -> Iterator[Inspector]:
    # One connection for the whole reflection: an Inspector on an Engine
    # would check a connection out of the pool for every call.
    if isinstance(bind, sa.Engine):
        with bind.connect() as connection:
            yield sa.inspect(connection)
    else:
        yield sa.inspect(bind)


def _normal_schema(schema: str | None, default: str | None) -> str | None:
    return None if schema is None or schema == default else schema


def _scope_schemas(
    scope: ReflectionScope, default: str | None
) -> list[str | None]:
    if not scope.schemas:
        return [None]
    schemas: list[str | None] = []
    for schema in scope.schemas:
        normal = _normal_schema(schema, default)
        if normal not in schemas:
            schemas.append(normal)
    return schemas


def _in_scope(table: str, schema: str | None, scope: ReflectionScope) -> bool:
    names = (qualified_name(table, schema), table)

    def matches(patterns: tuple[str, ...]) -> bool:
        return any(
            fnmatch.fnmatchcase(name, pattern)
            for pattern in patterns
            for name in names
        )

    if scope.include_tables and not matches(scope.include_tables):
        return False
    return not matches(scope.exclude_tables)


def _view_names(inspector: Inspector, schema: str | None) -> set[str]:
    views = set(inspector.get_view_names(schema))
    # Only some dialects know materialized views.
    with contextlib.suppress(NotImplementedError):
        views.update(inspector.get_materialized_view_names(schema))
    return views


def _list(
    inspector: Inspector, scope: ReflectionScope
) -> dict[str, tuple[str | None, str, bool]]:
    """Return ``{qualified: (schema, table, is_view)}`` for the scope."""
    default = inspector.default_schema_name
    found: dict[str, tuple[str | None, str, bool]] = {}
    for schema in _scope_schemas(scope, default):
        views = _view_names(inspector, schema)
        for table in [*inspector.get_table_names(schema), *views]:
            if _in_scope(table, schema, scope):
                found[qualified_name(table, schema)] = (
                    schema,
                    table,
                    table in views,
                )
    return dict(sorted(found.items()))


def list_tables(
    bind: Connection | Engine, scope: ReflectionScope
) -> list[str]:
    """Return the sorted qualified names of the tables and views in scope."""
    with _inspector(bind) as inspector:
        return list(_list(inspector, scope))


def _native_name(type_: sa.types.TypeEngine[Any], dialect: Dialect) -> str:
    try:
        return str(type_.compile(dialect=dialect))
    except sa.exc.CompileError:
        return type(type_).__name__


def _generic_args(generic: sa.types.TypeEngine[Any]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    parameters = pyinspect.signature(type(generic).__init__).parameters
    for name, parameter in parameters.items():
        if name == "self" or parameter.kind in (
            parameter.VAR_POSITIONAL,
            parameter.VAR_KEYWORD,
        ):
            continue
        value = getattr(generic, name, parameter.default)
        if value is parameter.empty or not isinstance(value, _PLAIN_SCALARS):
            continue
        if parameter.default is not parameter.empty and (
            type(value) is type(parameter.default)
            and value == parameter.default
        ):
            continue
        args[name] = value
    return args


def _describe_type(
    type_: sa.types.TypeEngine[Any], dialect: Dialect
) -> dict[str, Any]:
    native = _native_name(type_, dialect)
    unknown = {"name": "NullType", "args": {}, "native": native}
    try:
        generic = type_.as_generic()
    except NotImplementedError:
        return unknown
    # Only a type that sqlalchemy.types names can be rebuilt elsewhere.
    if getattr(satypes, type(generic).__name__, None) is not type(generic):
        return unknown

    args: dict[str, Any]
    if isinstance(generic, sa.Enum):
        # Enum takes its values as *args, invisible to the signature.
        name = getattr(type_, "name", None) or generic.name
        args = {"enums": list(generic.enums), "name": name}
    elif isinstance(generic, sa.ARRAY):
        args = _generic_args(generic)
        args["item_type"] = _describe_type(generic.item_type, dialect)
    else:
        args = _generic_args(generic)
    return {"name": type(generic).__name__, "args": args, "native": native}


def _rebuild_type(description: dict[str, Any]) -> sa.types.TypeEngine[Any]:
    cls = getattr(satypes, str(description.get("name")), None)
    if not (
        isinstance(cls, type)
        and issubclass(cls, satypes.TypeEngine)
        and cls is not satypes.NullType
    ):
        return satypes.NullType()
    args = dict(description.get("args") or {})
    positional: list[Any] = []
    if issubclass(cls, sa.Enum):
        positional = list(args.pop("enums", []))
    elif issubclass(cls, sa.ARRAY):
        positional = [_rebuild_type(args.pop("item_type", {}))]

    # A description may come from another SQLAlchemy release whose
    # constructor takes other arguments: degrade, never fail.
    for attempt in (args, {}):
        try:
            return cls(*positional, **attempt)
        except TypeError:
            continue
    return satypes.NullType()


def _description(
    inspector: Inspector,
    table: str,
    schema: str | None,
    *,
    is_view: bool,
    columns: list[Any],
    primary_key: Any,
    foreign_keys: list[Any],
) -> dict[str, Any]:
    default = inspector.default_schema_name
    dialect = inspector.dialect
    pk_columns = list((primary_key or {}).get("constrained_columns") or [])
    described_columns = []
    for column in columns:
        autoincrement = column.get("autoincrement", "auto")
        computed = column.get("computed")
        described_columns.append(
            {
                "name": column["name"],
                "type": _describe_type(column["type"], dialect),
                "nullable": bool(column.get("nullable", True)),
                "default": column.get("default"),
                "autoincrement": (
                    autoincrement
                    if isinstance(autoincrement, bool)
                    else "auto"
                ),
                "primary_key": column["name"] in pk_columns,
                "computed": (str(computed["sqltext"]) if computed else None),
                "identity": bool(column.get("identity")),
            }
        )
    described_fks = [
        {
            "name": fk.get("name"),
            "columns": list(fk["constrained_columns"]),
            "referred_schema": _normal_schema(
                fk.get("referred_schema"), default
            ),
            "referred_table": fk["referred_table"],
            "referred_columns": list(fk["referred_columns"]),
        }
        for fk in foreign_keys
        if fk.get("referred_table") and fk.get("constrained_columns")
    ]
    described_fks.sort(
        key=lambda fk: json.dumps(fk, sort_keys=True, default=str)
    )
    return {
        "name": table,
        "schema": _normal_schema(schema, default),
        "columns": described_columns,
        "primary_key": pk_columns,
        "foreign_keys": described_fks,
        "is_view": is_view,
    }


def describe_table(
    inspector: Inspector,
    table: str,
    schema: str | None,
    *,
    is_view: bool | None = None,
) -> dict[str, Any]:
    """Return the plain-data description of one table or view.

    ``is_view`` is looked up when not given.  Raises
    ``sqlalchemy.exc.NoSuchTableError`` for a missing table.
    """
    schema = _normal_schema(schema, inspector.default_schema_name)
    if is_view is None:
        is_view = table in _view_names(inspector, schema)
    return _description(
        inspector,
        table,
        schema,
        is_view=is_view,
        columns=inspector.get_columns(table, schema),
        primary_key=inspector.get_pk_constraint(table, schema),
        foreign_keys=(
            [] if is_view else inspector.get_foreign_keys(table, schema)
        ),
    )


def reflect_tables(
    bind: Connection | Engine,
    scope: ReflectionScope,
    names: Iterable[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Return ``{qualified name: description}`` for the tables in scope.

    ``names`` restricts the result to those qualified names; a name out
    of scope, or a table dropped while reflecting, is left out.
    """
    with _inspector(bind) as inspector:
        listed = _list(inspector, scope)
        wanted = list(listed) if names is None else list(names)
        by_schema: dict[str | None, list[str]] = {}
        for name in wanted:
            if name in listed:
                by_schema.setdefault(listed[name][0], []).append(
                    listed[name][1]
                )
            else:
                _log.debug("schema.table_skipped", table=name)

        result: dict[str, dict[str, Any]] = {}
        for schema, tables in by_schema.items():
            result.update(_reflect_schema(inspector, schema, tables, listed))
        return dict(sorted(result.items()))


def _reflect_schema(
    inspector: Inspector,
    schema: str | None,
    tables: list[str],
    listed: dict[str, tuple[str | None, str, bool]],
) -> dict[str, dict[str, Any]]:
    # The multi-table calls cost one catalog query each on PostgreSQL,
    # instead of one per table.
    options: dict[str, Any] = {
        "schema": schema,
        "filter_names": tables,
        "kind": ObjectKind.ANY,
    }
    columns = inspector.get_multi_columns(**options)
    primary_keys = inspector.get_multi_pk_constraint(**options)
    foreign_keys = inspector.get_multi_foreign_keys(
        **{**options, "kind": ObjectKind.TABLE}
    )
    result: dict[str, dict[str, Any]] = {}
    for table in tables:
        key = (schema, table)
        qualified = qualified_name(table, schema)
        if key not in columns or not columns[key]:
            _log.debug("schema.table_vanished", table=qualified)
            continue
        result[qualified] = _description(
            inspector,
            table,
            schema,
            is_view=listed[qualified][2],
            columns=columns[key],
            primary_key=primary_keys.get(key),
            foreign_keys=foreign_keys.get(key, []),
        )
    return result


def table_from_description(
    description: dict[str, Any], metadata: sa.MetaData
) -> sa.Table:
    """Build a ``Table`` in ``metadata`` from a plain-data description.

    A foreign key whose referred table is already in ``metadata`` points
    at its columns; otherwise it is resolved later by name, which does
    not work for names that contain a dot.
    """
    columns = []
    for column in description["columns"]:
        type_ = _rebuild_type(column["type"])
        extra: list[Any] = []
        if column.get("computed"):
            extra.append(sa.Computed(sa.text(column["computed"])))
        elif column.get("identity"):
            extra.append(sa.Identity())
        autoincrement = column.get("autoincrement", "auto")
        if autoincrement is True and not isinstance(
            type_, satypes.Integer | satypes.Numeric
        ):
            autoincrement = "auto"
        default = column.get("default")
        columns.append(
            sa.Column(
                column["name"],
                type_,
                *extra,
                nullable=bool(column.get("nullable", True)),
                server_default=(
                    None if default is None or extra else sa.text(str(default))
                ),
                autoincrement=autoincrement,
            )
        )

    constraints: list[sa.Constraint] = []
    if description.get("primary_key"):
        constraints.append(
            sa.PrimaryKeyConstraint(*description["primary_key"])
        )
    for fk in description.get("foreign_keys") or ():
        target_key = qualified_name(
            fk["referred_table"], fk["referred_schema"]
        )
        target = metadata.tables.get(target_key)
        refcolumns: list[Any]
        if target is not None and all(
            name in target.c for name in fk["referred_columns"]
        ):
            refcolumns = [target.c[name] for name in fk["referred_columns"]]
        else:
            refcolumns = [
                f"{target_key}.{name}" for name in fk["referred_columns"]
            ]
        constraints.append(
            sa.ForeignKeyConstraint(
                fk["columns"], refcolumns, name=fk.get("name")
            )
        )
    return sa.Table(
        description["name"],
        metadata,
        *columns,
        *constraints,
        schema=description.get("schema"),
        info={"is_view": bool(description.get("is_view"))},
    )


def diff_schemas(
    old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Return what changed between two ``reflect_tables`` results.

    ``tables_altered`` maps a table to its ``columns_added``,
    ``columns_removed``, ``columns_altered`` and ``altered`` (which of
    ``primary_key``, ``foreign_keys``, ``is_view`` and ``column_order``
    changed); a table appears there only when something did.
    """
    altered: dict[str, dict[str, list[str]]] = {}
    for name in sorted(old.keys() & new.keys()):
        change = _diff_table(old[name], new[name])
        if any(change.values()):
            altered[name] = change
    return {
        "tables_added": sorted(new.keys() - old.keys()),
        "tables_removed": sorted(old.keys() - new.keys()),
        "tables_altered": altered,
    }


def _diff_table(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    old_columns = {column["name"]: column for column in old["columns"]}
    new_columns = {column["name"]: column for column in new["columns"]}
    common = [name for name in new_columns if name in old_columns]
    table_level = [
        key
        for key in ("primary_key", "foreign_keys", "is_view")
        if old.get(key) != new.get(key)
    ]
    if [name for name in old_columns if name in new_columns] != common:
        table_level.append("column_order")
    return {
        "columns_added": [name for name in new_columns if name not in common],
        "columns_removed": [
            name for name in old_columns if name not in new_columns
        ],
        "columns_altered": [
            name for name in common if old_columns[name] != new_columns[name]
        ],
        "altered": table_level,
    }


_PG_COLUMNS = sa.text(
    """
    SELECT n.nspname, c.relname, c.relkind, a.attnum, a.attname,
           pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
           pg_catalog.pg_get_expr(d.adbin, d.adrelid),
           a.attidentity, a.attgenerated
    FROM pg_catalog.pg_class AS c
    JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
    LEFT JOIN pg_catalog.pg_attribute AS a
      ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_catalog.pg_attrdef AS d
      ON d.adrelid = c.oid AND d.adnum = a.attnum
    WHERE n.nspname IN :schemas AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
    """
).bindparams(sa.bindparam("schemas", expanding=True))

_PG_CONSTRAINTS = sa.text(
    """
    SELECT n.nspname, c.relname, con.conname, con.contype,
           pg_catalog.pg_get_constraintdef(con.oid)
    FROM pg_catalog.pg_constraint AS con
    JOIN pg_catalog.pg_class AS c ON c.oid = con.conrelid
    JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
    WHERE n.nspname IN :schemas AND con.contype IN ('p', 'f', 'u')
    """
).bindparams(sa.bindparam("schemas", expanding=True))

_MYSQL_TABLES = sa.text(
    """
    SELECT TABLE_SCHEMA, TABLE_NAME, TABLE_TYPE
    FROM information_schema.TABLES WHERE TABLE_SCHEMA IN :schemas
    """
).bindparams(sa.bindparam("schemas", expanding=True))

_MYSQL_COLUMNS = sa.text(
    """
    SELECT TABLE_SCHEMA, TABLE_NAME, ORDINAL_POSITION, COLUMN_NAME,
           COLUMN_TYPE, IS_NULLABLE, COLUMN_DEFAULT, COLUMN_KEY, EXTRA
    FROM information_schema.COLUMNS WHERE TABLE_SCHEMA IN :schemas
    """
).bindparams(sa.bindparam("schemas", expanding=True))

_MYSQL_KEYS = sa.text(
    """
    SELECT TABLE_SCHEMA, TABLE_NAME, CONSTRAINT_NAME, ORDINAL_POSITION,
           COLUMN_NAME, REFERENCED_TABLE_SCHEMA, REFERENCED_TABLE_NAME,
           REFERENCED_COLUMN_NAME
    FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA IN :schemas
    """
).bindparams(sa.bindparam("schemas", expanding=True))

_SQLITE_MASTER = sa.text("SELECT tbl_name, type, name, sql FROM sqlite_master")


def fingerprint(bind: Connection | Engine, scope: ReflectionScope) -> str:
    """Return a sha256 hex digest of the catalog rows the scope covers.

    It changes when a table, view, column, default or key of a table in
    scope does, and costs a few catalog queries, so it is cheap enough
    to run before deciding on a full reflection.  Dialects without a
    catalog query here fall back to hashing ``reflect_tables``.
    """
    if isinstance(bind, sa.Engine):
        with bind.connect() as connection:
            return fingerprint(connection, scope)

    dialect = bind.dialect.name
    default = bind.dialect.default_schema_name
    schemas = [
        default if schema is None else schema
        for schema in _scope_schemas(scope, default)
    ]
    queries: dict[str, sa.TextClause] = {}
    if dialect == "postgresql":
        queries = {"columns": _PG_COLUMNS, "constraints": _PG_CONSTRAINTS}
    elif dialect in {"mysql", "mariadb"}:
        queries = {
            "tables": _MYSQL_TABLES,
            "columns": _MYSQL_COLUMNS,
            "keys": _MYSQL_KEYS,
        }
    elif dialect == "sqlite" and schemas == ["main"]:
        # Every table, view, index and trigger with its CREATE text,
        # which ALTER TABLE rewrites too.
        rows = [
            ["master", None, *row]
            for row in bind.execute(_SQLITE_MASTER)
            if not str(row[0]).startswith("sqlite_")
        ]
        return _digest(dialect, _rows_in_scope(rows, scope, default))

    if not queries:
        tables = reflect_tables(bind, scope)
        return _digest(
            "generic", ([name, table] for name, table in tables.items())
        )

    rows = []
    for label, query in queries.items():
        rows.extend(
            [label, *row] for row in bind.execute(query, {"schemas": schemas})
        )
    return _digest(dialect, _rows_in_scope(rows, scope, default))


def _rows_in_scope(
    rows: list[list[Any]], scope: ReflectionScope, default: str | None
) -> Iterator[list[Any]]:
    """Keep rows laid out as ``[label, schema, table, ...]`` in scope."""
    for row in rows:
        if _in_scope(str(row[2]), _normal_schema(row[1], default), scope):
            yield row


def _digest(label: str, rows: Iterable[list[Any]]) -> str:
    # Sorted here rather than in SQL: catalog collations differ, and
    # MariaDB's are case-insensitive.
    lines = sorted(
        json.dumps(list(row), default=str, sort_keys=True) for row in rows
    )
    digest = hashlib.sha256(label.encode())
    for line in lines:
        digest.update(b"\n")
        digest.update(line.encode())
    return digest.hexdigest()
