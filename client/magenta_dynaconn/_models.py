"""ORM classes built at run time from plain-data table descriptions.

One ``ModelFactory`` serves one database: it owns a ``MetaData`` and
maps each batch of classes in a ``registry`` of its own, so two
databases with a ``product`` table never share anything, and a table
whose schema changed can get a new class while the others keep theirs.

The rules, the same on every run:

- **No primary key.**  A table or view without one has no class:
  ``get()`` raises ``NoPrimaryKeyError`` naming the database, the table
  and the remedy; ``table()`` still gives its ``sqlalchemy.Table`` for
  read-only Core queries.  Other tables are unaffected.
- **Reserved attribute names.**  A column whose name is a Python
  keyword, a dunder, starts with ``_sa_``, or is taken by SQLAlchemy or
  by ``Model`` (``metadata``, ``registry``, ``query``, ``create``,
  ``get``, ``update``, ``delete``, ``read_all``, ``read_one``,
  ``as_dict``...) is mapped as ``<name>_`` (more underscores while that
  is another column's name).  The SQL column name never changes; the
  constructor, the filters and ``as_dict`` use attribute names.
- **Relationships.**  Each foreign key to a table with a primary key
  becomes a many-to-one relationship, with ``foreign_keys`` explicit and
  no backref.  Its name is the column name without ``_id`` for a
  one-column key named ``..._id`` (``customer_id`` -> ``customer``),
  else the key's columns joined by ``_`` plus ``_rel`` (``opened_by``
  -> ``opened_by_rel``); characters that cannot be in an identifier
  become ``_``.  A name already taken by a column attribute, a reserved
  name or an earlier relationship (keys sorted by their columns) gets
  ``_rel``, then ``_rel_2``, ``_rel_3``...  A column is never shadowed.
- **Class names.**  The table name in CamelCase (``sales.orders`` ->
  ``SalesOrders``), with a short hash of the table name appended when
  two tables of the database would get the same one.
- **Helpers flush, never commit**: the caller owns the transaction.
- **Crossing processes.**  Instances of generated classes cannot be
  pickled by reference; ``as_dict()`` gives the plain values that can
  go on a ``multiprocessing.Queue``, and ``Model(**values)`` rebuilds
  an instance on the other side.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import keyword
import re
import threading
from typing import TYPE_CHECKING, Any, ClassVar, Self, cast

import sqlalchemy as sa
from sqlalchemy import orm

from dynaconnd.errors import NoPrimaryKeyError, UnknownTableError
from dynaconnd.logs import get_logger
from dynaconnd.schema import qualified_name, table_from_description

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = ["RESERVED_NAMES", "Model", "ModelFactory"]

_log = get_logger("models")


class Model:
    """The base of every generated class: CRUD helpers and ``as_dict``.

    The helpers take the session to use and only ``flush()``: committing
    is the caller's decision.
    """

    __database__: ClassVar[str]
    __table_key__: ClassVar[str]
    __table__: ClassVar[sa.Table]
    __column_attributes__: ClassVar[dict[str, str]]

    def __init__(self, **values: Any) -> None:
        """Set mapped attributes by name, as the declarative base does."""
        _check_keys(type(self), values)
        for key, value in values.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        mapper = orm.class_mapper(type(self))
        keys = " ".join(
            f"{prop.key}={getattr(self, prop.key, None)!r}"
            for prop in (
                mapper.get_property_by_column(column)
                for column in mapper.primary_key
            )
        )
        return f"<{type(self).__name__} {keys}>"

    def as_dict(self) -> dict[str, Any]:
        """Return the column values by attribute name, as plain data."""
        mapper = orm.class_mapper(type(self))
        return {
            prop.key: getattr(self, prop.key) for prop in mapper.column_attrs
        }

    def __reduce__(self) -> tuple[type[dict[str, Any]], tuple[Any, ...]]:
        # Generated classes have no importable name, so a row cannot be
        # pickled as itself; it crosses processes (a Queue, a Pool) as
        # its column values, which Model(**values) turns back into a row.
        return (dict, (self.as_dict(),))

    @classmethod
    def create(cls, session: orm.Session, **values: Any) -> Self:
        """Add a new row, flush it and return it."""
        instance = cls(**values)
        session.add(instance)
        session.flush()
        return instance

    @classmethod
    def read_all(cls, session: orm.Session) -> list[Self]:
        """Return every row, ordered by primary key."""
        return list(session.scalars(sa.select(cls).order_by(*_pk(cls))))

    @classmethod
    def read_one(cls, session: orm.Session, **filters: Any) -> Self | None:
        """Return the first row (by primary key) matching, or ``None``."""
        _check_keys(cls, filters)
        statement = (
            sa.select(cls).filter_by(**filters).order_by(*_pk(cls)).limit(1)
        )
        return session.scalars(statement).first()

    @classmethod
    def get(cls, session: orm.Session, pk: Any) -> Self | None:
        """Return the row with primary key ``pk`` (a tuple if composite)."""
        return session.get(cls, pk)

    @classmethod
    def update(
        cls,
        session: orm.Session,
        filters: dict[str, Any],
        values: dict[str, Any],
    ) -> int:
        """Set ``values`` on the rows matching ``filters``; return the count.

        At least one filter is required, so a forgotten filter never
        rewrites a whole table.
        """
        _require_filters(cls, "update", filters)
        _check_keys(cls, values)
        statement = sa.update(cls).filter_by(**filters).values(values)
        result = cast("sa.CursorResult[Any]", session.execute(statement))
        return int(result.rowcount)

    @classmethod
    def delete(cls, session: orm.Session, **filters: Any) -> int:
        """Delete the rows matching ``filters``; return the count.

        At least one filter is required.
        """
        _require_filters(cls, "delete", filters)
        statement = sa.delete(cls).filter_by(**filters)
        result = cast("sa.CursorResult[Any]", session.execute(statement))
        return int(result.rowcount)


RESERVED_NAMES: frozenset[str] = frozenset(
    {name for name in dir(Model) if not name.startswith("__")}
    | {
        "metadata",
        "registry",
        "query",
        "query_class",
        "awaitable_attrs",
    }
)


def _pk(cls: type[Model]) -> list[Any]:
    return list(orm.class_mapper(cls).primary_key)


def _describe_class(cls: type[Model]) -> str:
    return (
        f"{cls.__name__} (table {cls.__table_key__!r} in database "
        f"{cls.__database__!r})"
    )


def _check_keys(cls: type[Model], values: dict[str, Any]) -> None:
    mapper = orm.class_mapper(cls)
    unknown = [key for key in values if key not in mapper.attrs]
    if not unknown:
        return
    key = unknown[0]
    renamed = cls.__column_attributes__.get(key)
    hint = (
        f"; the column {key!r} is mapped as {renamed!r}"
        if renamed is not None and renamed != key
        else f"; attributes are {', '.join(sorted(mapper.attrs.keys()))}"
    )
    raise TypeError(
        f"{key!r} is not an attribute of {_describe_class(cls)}{hint}"
    )


def _require_filters(
    cls: type[Model], helper: str, filters: dict[str, Any]
) -> None:
    if not filters:
        raise ValueError(
            f"{helper}() on {_describe_class(cls)} needs at least one "
            "filter; it refuses to touch every row"
        )
    _check_keys(cls, filters)


def _is_reserved(name: str) -> bool:
    return (
        name in RESERVED_NAMES
        or keyword.iskeyword(name)
        or name.startswith("_sa_")
        or (name.startswith("__") and name.endswith("__"))
    )


def attribute_names(columns: Iterable[str]) -> dict[str, str]:
    """Return ``{column name: attribute name}`` under the reserved rule."""
    names = list(columns)
    taken = set(names)
    result: dict[str, str] = {}
    for name in names:
        candidate = name
        if _is_reserved(name):
            candidate = f"{name}_"
            while candidate in taken:
                candidate += "_"
            taken.add(candidate)
        result[name] = candidate
    return result


def _identifier(text: str) -> str:
    text = re.sub(r"\W", "_", text)
    return f"rel_{text}" if not text or text[0].isdigit() else text


def _fk_sort_key(fk: dict[str, Any]) -> str:
    return json.dumps(
        [
            fk["columns"],
            fk.get("referred_schema") or "",
            fk["referred_table"],
            fk["referred_columns"],
            fk.get("name") or "",
        ]
    )


def relationship_names(
    foreign_keys: Iterable[dict[str, Any]], taken: Iterable[str]
) -> list[tuple[str, dict[str, Any]]]:
    """Name one relationship per foreign key under the documented rule."""
    used = set(taken)
    named = []
    for fk in sorted(foreign_keys, key=_fk_sort_key):
        columns = list(fk["columns"])
        if len(columns) == 1 and columns[0].lower().endswith("_id"):
            base = _identifier(columns[0][:-3] or columns[0])
        else:
            base = _identifier("_".join(columns) + "_rel")
        stem = base if base.endswith("_rel") else f"{base}_rel"
        candidates = [base] if base == stem else [base, stem]
        number = 2
        while True:
            name = next(
                (
                    candidate
                    for candidate in candidates
                    if candidate not in used and not _is_reserved(candidate)
                ),
                None,
            )
            if name is not None:
                break
            candidates = [f"{stem}_{number}"]
            number += 1
        used.add(name)
        named.append((name, fk))
    return named


def class_name(table: str) -> str:
    """Return the CamelCase class name for a (qualified) table name."""
    parts = [part for part in re.split(r"[\W_]+", table) if part]
    name = "".join(part[0].upper() + part[1:] for part in parts)
    if not name or not name[0].isalpha():
        name = f"Table{name}"
    if keyword.iskeyword(name) or not name.isidentifier():
        name = f"{name}_"
    return name


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


class ModelFactory:
    """Build and cache the ORM classes of one database, on demand.

    ``describe(table)`` returns a table's plain-data description and
    raises ``KeyError`` for an unknown one; ``list_tables()`` returns the
    qualified names of the tables in scope.  Thread-safe.
    """

    def __init__(
        self,
        database: str,
        describe: Callable[[str], dict[str, Any]],
        list_tables: Callable[[], list[str]],
    ) -> None:
        self.database = database
        self._describe_fn = describe
        self._list_tables_fn = list_tables
        self._lock = threading.RLock()
        self._metadata = sa.MetaData()
        self._descriptions: dict[str, dict[str, Any] | None] = {}
        self._tables: dict[str, sa.Table] = {}
        # The foreign keys of each built table that resolve, with the
        # qualified name of the table each refers to.
        self._refers: dict[str, list[tuple[dict[str, Any], str]]] = {}
        self._classes: dict[str, type[Model]] = {}
        self._class_names: dict[str, str] = {}
        self._table_names: list[str] | None = None

    def __repr__(self) -> str:
        return (
            f"<ModelFactory database={self.database!r} "
            f"classes={len(self._classes)}>"
        )

    @property
    def metadata(self) -> sa.MetaData:
        """Return the ``MetaData`` holding this database's current tables."""
        return self._metadata

    def get(self, table: str) -> type[Any]:
        """Return the class for ``table``, building it on first use.

        The class is a ``Model`` subclass; it is typed ``Any`` because
        its column attributes exist only at run time.  Raises
        ``UnknownTableError`` or ``NoPrimaryKeyError``.
        """
        cls = self._classes.get(table)
        if cls is not None:
            return cls
        with self._lock:
            cls = self._classes.get(table)
            if cls is not None:
                return cls
            description = self._require(table)
            self._require_primary_key(table, description)
            return self._build(table)

    def table(self, table: str) -> sa.Table:
        """Return the ``Table`` for any table or view, keyed or not."""
        with self._lock:
            self._require(table)
            return self._table(table, set())

    def invalidate(self, tables: Iterable[str] | None = None) -> None:
        """Forget the classes of ``tables`` (all when ``None``).

        Classes whose relationships lead to a forgotten one, directly or
        not, are forgotten too; every other class stays the same object.
        Classes already handed out keep working on the old definition.
        """
        with self._lock:
            self._table_names = None
            if tables is None:
                self._metadata = sa.MetaData()
                self._descriptions.clear()
                self._tables.clear()
                self._refers.clear()
                self._classes.clear()
                return

            doomed = set(tables)
            grew = True
            while grew:
                grew = False
                for key, keys in self._refers.items():
                    if key not in doomed and any(
                        target in doomed for _fk, target in keys
                    ):
                        doomed.add(key)
                        grew = True
            for key in doomed:
                self._classes.pop(key, None)
                self._descriptions.pop(key, None)
                self._refers.pop(key, None)
                old = self._tables.pop(key, None)
                if old is not None:
                    self._metadata.remove(old)

    def _describe(self, table: str) -> dict[str, Any] | None:
        if table not in self._descriptions:
            try:
                description = self._describe_fn(table)
            except KeyError:
                description = None
            self._descriptions[table] = description
        return self._descriptions[table]

    def _known_tables(self) -> list[str]:
        if self._table_names is None:
            self._table_names = list(self._list_tables_fn())
        return self._table_names

    def _require(self, table: str) -> dict[str, Any]:
        description = self._describe(table)
        if description is not None:
            return description
        # Not cached: the table may be created before the next call.
        self._descriptions.pop(table, None)
        self._table_names = None
        matches = difflib.get_close_matches(table, self._known_tables(), n=3)
        hint = (
            f"; did you mean {', '.join(repr(name) for name in matches)}?"
            if matches
            else ""
        )
        raise UnknownTableError(
            f"database {self.database!r} has no table {table!r} in its "
            f"reflection scope{hint}"
        )

    def _require_primary_key(
        self, table: str, description: dict[str, Any]
    ) -> None:
        if description.get("primary_key"):
            return
        kind = "view" if description.get("is_view") else "table"
        raise NoPrimaryKeyError(
            f"database {self.database!r}: {kind} {table!r} has no primary "
            "key, so it has no ORM class; add a primary key to it, or read "
            f"it with Core through table({table!r})"
        )

    def _targets(
        self, description: dict[str, Any]
    ) -> list[tuple[dict[str, Any], str]]:
        """Return ``(foreign key, target)`` for the keys that resolve."""
        usable = []
        for fk in description.get("foreign_keys") or ():
            target = qualified_name(
                fk["referred_table"], fk["referred_schema"]
            )
            target_description = self._describe(target)
            columns = {
                column["name"]
                for column in (target_description or {}).get("columns", ())
            }
            if (
                target_description is None
                or not set(fk["referred_columns"]) <= columns
            ):
                # Out of scope or gone: the column stays, the key goes.
                _log.debug(
                    "models.foreign_key_dropped",
                    database=self.database,
                    table=qualified_name(
                        description["name"], description.get("schema")
                    ),
                    target=target,
                )
                continue
            usable.append((fk, target))
        return usable

    def _mappable(self, target: str) -> bool:
        description = self._describe(target)
        return bool(description and description.get("primary_key"))

    def _table(self, key: str, visiting: set[str]) -> sa.Table:
        """Build the ``Table`` for ``key``, referred tables first."""
        existing = self._tables.get(key)
        if existing is not None:
            return existing
        visiting.add(key)
        description = self._describe(key)
        assert description is not None
        targets = self._targets(description)
        for _fk, target in targets:
            if target not in visiting:
                self._table(target, visiting)
        usable = dict(description)
        usable["foreign_keys"] = [fk for fk, _target in targets]
        table = table_from_description(usable, self._metadata)
        self._tables[key] = table
        self._refers[key] = targets
        return table

    def _class_name(self, key: str) -> str:
        name = self._class_names.get(key)
        if name is not None:
            return name
        name = class_name(key)
        others = [other for other in self._known_tables() if other != key]
        if name in self._class_names.values() or any(
            class_name(other) == name for other in others
        ):
            name = f"{name}_{_short_hash(key)}"
        self._class_names[key] = name
        return name

    def _build(self, table: str) -> type[Model]:
        # The requested class and every class its many-to-one
        # relationships reach, transitively, that is not built yet.
        needed: list[str] = []
        stack = [table]
        while stack:
            key = stack.pop()
            if key in needed or key in self._classes:
                continue
            needed.append(key)
            self._table(key, set())
            stack.extend(
                target
                for _fk, target in self._refers[key]
                if self._mappable(target)
            )

        new: dict[str, type[Model]] = {}
        for key in needed:
            sa_table = self._tables[key]
            new[key] = cast(
                "type[Model]",
                type(
                    self._class_name(key),
                    (Model,),
                    {
                        "__module__": __name__,
                        "__qualname__": self._class_name(key),
                        "__doc__": (
                            f"Rows of {key!r} in database {self.database!r}."
                        ),
                        "__database__": self.database,
                        "__table_key__": key,
                        "__table__": sa_table,
                        "__column_attributes__": attribute_names(
                            sa_table.c.keys()
                        ),
                    },
                ),
            )

        # A registry per batch: a later batch may replace some of these
        # classes without touching the registries of the others.
        registry = orm.registry(metadata=self._metadata)
        try:
            for key, cls in new.items():
                registry.map_imperatively(
                    cls,
                    self._tables[key],
                    properties=self._properties(key, cls, new),
                )
            registry.configure(cascade=True)
        except Exception:
            registry.dispose()
            raise
        self._classes.update(new)
        return new[table]

    def _properties(
        self, key: str, cls: type[Model], new: dict[str, type[Model]]
    ) -> dict[str, Any]:
        sa_table = self._tables[key]
        attributes = cls.__column_attributes__
        properties: dict[str, Any] = {
            attribute: sa_table.c[column]
            for column, attribute in attributes.items()
            if attribute != column
        }
        mapped = [
            fk for fk, target in self._refers[key] if self._mappable(target)
        ]
        for name, fk in relationship_names(mapped, attributes.values()):
            target = qualified_name(
                fk["referred_table"], fk["referred_schema"]
            )
            target_cls = new.get(target) or self._classes[target]
            target_table = self._tables[target]
            local = [sa_table.c[column] for column in fk["columns"]]
            remote = [
                target_table.c[column] for column in fk["referred_columns"]
            ]
            properties[name] = orm.relationship(
                target_cls,
                primaryjoin=sa.and_(
                    *(
                        mine == theirs
                        for mine, theirs in zip(local, remote, strict=True)
                    )
                ),
                foreign_keys=local,
                remote_side=remote if target == key else None,
                uselist=False,
            )
        return properties
