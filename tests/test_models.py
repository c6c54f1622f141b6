"""Specifications for the ORM classes built from table descriptions."""

# The house style writes asserts as ``expected == actual``.

from __future__ import annotations

import multiprocessing
import pickle
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import orm

from dynaconnd import schema
from dynaconnd.errors import NoPrimaryKeyError, UnknownTableError
from dynaconnd.spec import ReflectionScope
from magenta_dynaconn._models import (
    RESERVED_NAMES,
    ModelFactory,
    class_name,
    relationship_names,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from sqlalchemy.engine import URL


class Catalog:
    """Descriptions reflected from a live database, refreshed on demand."""

    def __init__(
        self, engine: sa.Engine, scope: ReflectionScope | None = None
    ) -> None:
        self.engine = engine
        self.scope = scope or ReflectionScope()
        self.describe_calls: list[str] = []
        self.refresh()

    def refresh(self) -> None:
        """Reflect the whole scope again."""
        self.tables = schema.reflect_tables(self.engine, self.scope)

    def describe(self, table: str) -> dict[str, Any]:
        """Return one description; KeyError for an unknown table."""
        self.describe_calls.append(table)
        return self.tables[table]

    def list_tables(self) -> list[str]:
        """Return the qualified names reflected."""
        return sorted(self.tables)

    def factory(self, database: str = "main") -> ModelFactory:
        """Return a factory on this catalog."""
        return ModelFactory(database, self.describe, self.list_tables)


@pytest.fixture
def engine(db_url: URL) -> Iterator[sa.Engine]:
    """Yield an engine on an empty database of each backend."""
    engine = sa.create_engine(db_url)
    yield engine
    engine.dispose()


def create(engine: sa.Engine, *tables: sa.Table) -> None:
    """Create the given tables (built on one MetaData)."""
    tables[0].metadata.create_all(engine, tables=list(tables))


def shop(engine: sa.Engine) -> Catalog:
    """Create product, customer, orders and C4's tables and view."""
    metadata = sa.MetaData()
    create(
        engine,
        sa.Table(
            "product",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", sa.String(80), nullable=False),
            sa.Column("description", sa.String(200)),
        ),
        sa.Table(
            "customer",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", sa.String(80)),
        ),
        sa.Table(
            "orders",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("customer_id", sa.ForeignKey("customer.id")),
            sa.Column("product_id", sa.ForeignKey("product.id")),
        ),
        sa.Table(
            "audit_log",
            metadata,
            sa.Column("ts", sa.String(40)),
            sa.Column("msg", sa.String(200)),
        ),
    )
    with engine.begin() as connection:
        connection.execute(
            sa.text("CREATE VIEW customer_names AS SELECT name FROM customer")
        )
    return Catalog(engine)


def test_quickstart_shape(engine: sa.Engine) -> None:
    """Construct, add and commit as the quickstart does, then read back."""
    Product = shop(engine).factory().get("product")

    with orm.Session(engine) as session:
        p = Product(name="Demo", description="Test")
        session.add(p)
        session.commit()
        pk = p.id
    with orm.Session(engine) as session:
        rows = [row.as_dict() for row in Product.read_all(session)]

    assert [{"id": pk, "name": "Demo", "description": "Test"}] == rows


def test_crud_helpers(engine: sa.Engine) -> None:
    """create, read_all, read_one, get, update and delete do their job."""
    Product = shop(engine).factory().get("product")

    with orm.Session(engine) as session:
        a = Product.create(session, name="a", description="first")
        b = Product.create(session, name="b")
        session.commit()

        assert ["a", "b"] == [p.name for p in Product.read_all(session)]
        assert b is Product.read_one(session, name="b")
        assert Product.read_one(session, name="nope") is None
        assert a is Product.get(session, a.id)
        assert Product.get(session, 10_000) is None
        assert 2 == Product.update(
            session, {"description": None}, {"description": "x"}
        ) + Product.update(session, {"name": "a"}, {"description": "x"})
        assert ["x", "x"] == [p.description for p in Product.read_all(session)]
        assert 1 == Product.delete(session, name="a")
        session.commit()

        assert ["b"] == [p.name for p in Product.read_all(session)]


def test_helpers_flush_and_leave_the_commit_to_the_caller(
    engine: sa.Engine,
) -> None:
    """A created row is visible in its session and gone after rollback."""
    Product = shop(engine).factory().get("product")

    with orm.Session(engine) as session:
        created = Product.create(session, name="temp")

        assert created.id is not None
        session.rollback()
        assert [] == Product.read_all(session)


def test_update_and_delete_need_a_filter(engine: sa.Engine) -> None:
    """An empty filter is refused instead of touching every row."""
    Product = shop(engine).factory().get("product")

    with orm.Session(engine) as session:
        with pytest.raises(ValueError, match="at least one filter"):
            Product.update(session, {}, {"name": "x"})
        with pytest.raises(ValueError, match="at least one filter"):
            Product.delete(session)


def test_unknown_attribute_is_a_type_error(engine: sa.Engine) -> None:
    """A misspelt keyword names the class, table and database."""
    Product = shop(engine).factory().get("product")

    with pytest.raises(TypeError, match="'nmae' is not an attribute of"):
        Product(nmae="x")


def test_tables_without_primary_key_c4(engine: sa.Engine) -> None:
    """audit_log and the view raise NoPrimaryKeyError; others still map."""
    catalog = shop(engine)
    factory = catalog.factory("crm")

    for name, kind in (("audit_log", "table"), ("customer_names", "view")):
        with pytest.raises(NoPrimaryKeyError) as raised:
            factory.get(name)

        assert (
            f"database 'crm': {kind} '{name}' has no primary key, so it has "
            "no ORM class; add a primary key to it, or read it with Core "
            f"through table('{name}')"
        ) == str(raised.value)

    Customer = factory.get("customer")
    factory.invalidate()
    with orm.Session(engine) as session:
        Customer.create(session, name="Ada")
        session.commit()
        names = session.scalars(
            sa.select(factory.table("customer_names").c.name)
        ).all()

    assert ["Ada"] == names
    assert Customer is not factory.get("customer")
    with pytest.raises(NoPrimaryKeyError):
        factory.get("audit_log")


def test_foreign_keys_named_like_columns_c5(engine: sa.Engine) -> None:
    """Three FKs to person keep their columns; relationships get _rel."""
    metadata = sa.MetaData()
    create(
        engine,
        sa.Table(
            "person",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", sa.String(80)),
        ),
        sa.Table(
            "ticket",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("person", sa.ForeignKey("person.id")),
            sa.Column("opened_by", sa.ForeignKey("person.id")),
            sa.Column("closed_by", sa.ForeignKey("person.id")),
        ),
    )
    catalog = Catalog(engine)
    factory = catalog.factory()
    Person, Ticket = factory.get("person"), factory.get("ticket")

    with orm.Session(engine) as session:
        ada, bob, cy = (
            Person.create(session, name=name) for name in ("ada", "bob", "cy")
        )
        Ticket.create(
            session, person=ada.id, opened_by=bob.id, closed_by=cy.id
        )
        ids = (ada.id, bob.id, cy.id)
        session.commit()
    with orm.Session(engine) as session:
        ticket = Ticket.read_all(session)[0]
        columns = (ticket.person, ticket.opened_by, ticket.closed_by)
        related = (
            ticket.person_rel.name,
            ticket.opened_by_rel.name,
            ticket.closed_by_rel.name,
        )

    assert ids == columns
    assert ("ada", "bob", "cy") == related
    assert {"closed_by_rel", "opened_by_rel", "person_rel"} == set(
        sa.inspect(Ticket).relationships.keys()
    )
    assert set(sa.inspect(Ticket).relationships.keys()) == set(
        sa.inspect(catalog.factory().get("ticket")).relationships.keys()
    )


def test_relationship_named_after_id_column(engine: sa.Engine) -> None:
    """orders.customer_id gives orders.customer; the target maps too."""
    catalog = shop(engine)
    factory = catalog.factory()
    Orders = factory.get("orders")
    Customer, Product = factory.get("customer"), factory.get("product")

    with orm.Session(engine) as session:
        order = Orders.create(
            session,
            customer=Customer(name="Ada"),
            product=Product(name="Demo"),
        )
        session.commit()

        assert ("Ada", "Demo") == (order.customer.name, order.product.name)
        assert order.customer_id == order.customer.id


def test_self_referential_key_is_many_to_one(sqlite_url: URL) -> None:
    """employee.manager_id gives employee.manager, one object."""
    engine = sa.create_engine(sqlite_url)
    metadata = sa.MetaData()
    create(
        engine,
        sa.Table(
            "employee",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("manager_id", sa.ForeignKey("employee.id")),
        ),
    )
    Employee = Catalog(engine).factory().get("employee")

    with orm.Session(engine) as session:
        boss = Employee.create(session)
        worker = Employee.create(session, manager=boss)

        assert (boss, boss.id) == (worker.manager, worker.manager_id)
    engine.dispose()


def test_relationship_naming_rule() -> None:
    """_id is dropped; taken names get _rel, then a number."""

    def fk(*columns: str) -> dict[str, Any]:
        return {
            "name": None,
            "columns": list(columns),
            "referred_schema": None,
            "referred_table": "t",
            "referred_columns": ["id"] * len(columns),
        }

    named = relationship_names(
        [fk("customer_id"), fk("owner id"), fk("a", "b"), fk("get_id")],
        taken=["customer_id", "owner id", "a", "b", "get_id", "a_b_rel"],
    )

    assert [
        ("a_b_rel_2", ["a", "b"]),
        ("customer", ["customer_id"]),
        ("get_rel", ["get_id"]),
        ("owner_id_rel", ["owner id"]),
    ] == [(name, fk["columns"]) for name, fk in named]


def test_reserved_names_map_with_a_trailing_underscore(
    engine: sa.Engine,
) -> None:
    """metadata, query, get... become metadata_, query_, get_..."""
    reserved = [
        "metadata",
        "registry",
        "query",
        "create",
        "get",
        "update",
        "delete",
        "read_all",
        "read_one",
        "as_dict",
        "_sa_extra",
        "class",
    ]
    metadata = sa.MetaData()
    create(
        engine,
        sa.Table(
            "things",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            *(sa.Column(name, sa.String(20)) for name in reserved),
            sa.Column("query_", sa.String(20)),
        ),
    )
    Things = Catalog(engine).factory().get("things")
    values = {f"{name}_": name for name in reserved if name != "query"}
    values |= {"query__": "query", "query_": "plain"}

    with orm.Session(engine) as session:
        created = Things.create(session, **values)
        session.commit()
        found = Things.read_one(session, metadata_="metadata", get_="get")
        assert 1 == Things.update(
            session, {"create_": "create"}, {"delete_": "gone"}
        )
        stored = session.execute(
            sa.select(Things.__table__.c["delete", "query", "query_"])
        ).one()

    assert created is found
    assert {"id": created.id, **values, "delete_": "gone"} == (
        created.as_dict()
    )
    assert ("gone", "query", "plain") == tuple(stored)
    assert callable(Things.get)
    assert callable(Things.read_one)
    assert {"create", "get", "metadata", "registry"} <= RESERVED_NAMES


def test_column_name_hint_for_renamed_column(engine: sa.Engine) -> None:
    """Passing the SQL name of a renamed column says what to use."""
    metadata = sa.MetaData()
    create(
        engine,
        sa.Table(
            "things",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("metadata", sa.String(20)),
        ),
    )
    Things = Catalog(engine).factory().get("things")

    with pytest.raises(TypeError, match="mapped as 'metadata_'"):
        Things(metadata="x")


def test_reserved_words_spaces_and_mixed_case(engine: sa.Engine) -> None:
    """order, user, select, spaces and MixedCase names all work."""
    metadata = sa.MetaData()
    create(
        engine,
        sa.Table(
            "user",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("select", sa.String(20)),
        ),
        sa.Table(
            "order",
            metadata,
            sa.Column("Id", sa.Integer, primary_key=True),
            sa.Column("user_id", sa.ForeignKey("user.id")),
            sa.Column("unit price", sa.Integer),
            sa.Column("MixedCase", sa.String(20)),
        ),
        sa.Table(
            "Order Items",
            metadata,
            sa.Column("item id", sa.Integer, primary_key=True),
            sa.Column("order", sa.ForeignKey("order.Id")),
        ),
    )
    factory = Catalog(engine).factory()
    User, Order = factory.get("user"), factory.get("order")
    OrderItems = factory.get("Order Items")

    with orm.Session(engine) as session:
        order = Order.create(
            session,
            user=User(select="x"),
            MixedCase="Mx",
            **{"unit price": 3},
        )
        OrderItems.create(session, order=order.Id)
        session.commit()
        item = OrderItems.read_one(session, order=order.Id)
        found = Order.read_one(session, MixedCase="Mx")

        assert ("User", "Order", "OrderItems") == (
            User.__name__,
            Order.__name__,
            OrderItems.__name__,
        )
        assert (order, "x") == (found, found.user.select)
        assert 3 == getattr(found, "unit price")
        assert order is item.order_rel


def test_postgresql_schema_qualified_table(pg_url: URL) -> None:
    """sales.orders maps as SalesOrders with its relationship."""
    engine = sa.create_engine(pg_url)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE SCHEMA sales"))
        connection.execute(
            sa.text(
                "CREATE TABLE sales.customer "
                "(id SERIAL PRIMARY KEY, name TEXT)"
            )
        )
        connection.execute(
            sa.text(
                "CREATE TABLE sales.orders (id SERIAL PRIMARY KEY, "
                "customer_id INTEGER REFERENCES sales.customer (id))"
            )
        )
    scope = ReflectionScope(schemas=("public", "sales"))
    Orders = Catalog(engine, scope).factory().get("sales.orders")

    with orm.Session(engine) as session:
        Orders.create(session, customer=Orders.customer.mapper.class_())
        session.commit()
        order = Orders.read_all(session)[0]

        assert ("SalesOrders", "SalesCustomer") == (
            Orders.__name__,
            type(order.customer).__name__,
        )
        assert order.customer_id == order.customer.id
    engine.dispose()


def test_two_databases_with_a_product_table_never_collide(
    engine: sa.Engine, tmp_path: Path
) -> None:
    """Each factory's Product has its own columns, table and metadata."""
    other = sa.create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    metadata = sa.MetaData()
    create(
        other,
        sa.Table(
            "product",
            metadata,
            sa.Column("sku", sa.String(20), primary_key=True),
            sa.Column("price", sa.Integer),
        ),
    )
    first = shop(engine).factory("main").get("product")
    second = Catalog(other).factory("stock").get("product")

    with orm.Session(engine) as session:
        first.create(session, name="Demo")
        session.commit()
    with orm.Session(other) as session:
        second.create(session, sku="A-1", price=3)
        session.commit()
        rows = [row.as_dict() for row in second.read_all(session)]

    assert [{"sku": "A-1", "price": 3}] == rows
    assert first.__table__.metadata is not second.__table__.metadata
    assert ("main", "stock") == (first.__database__, second.__database__)
    other.dispose()


def test_unknown_table_names_close_matches(engine: sa.Engine) -> None:
    """A misspelt table raises UnknownTableError with suggestions."""
    factory = shop(engine).factory("main")

    with pytest.raises(UnknownTableError) as raised:
        factory.get("prodcut")

    assert (
        "database 'main' has no table 'prodcut' in its reflection scope; "
        "did you mean 'product'?"
    ) == str(raised.value)
    assert isinstance(raised.value, KeyError)


def test_classes_are_built_lazily_and_cached(engine: sa.Engine) -> None:
    """Only the table asked for and its targets are described, once."""
    catalog = shop(engine)
    factory = catalog.factory()

    first = factory.get("orders")

    assert first is factory.get("orders")
    assert ["customer", "orders", "product"] == sorted(
        set(catalog.describe_calls)
    )


def test_invalidate_rebuilds_only_what_changed(engine: sa.Engine) -> None:
    """Changed tables and their dependents get new classes; others stay."""
    catalog = shop(engine)
    factory = catalog.factory()
    customer, product = factory.get("customer"), factory.get("product")
    orders = factory.get("orders")

    with engine.begin() as connection:
        connection.execute(
            sa.text("ALTER TABLE customer ADD COLUMN email VARCHAR(100)")
        )
    catalog.refresh()
    factory.invalidate(["customer"])
    new_customer = factory.get("customer")
    new_orders = factory.get("orders")

    assert product is factory.get("product")
    assert new_customer is not customer
    assert new_orders is not orders
    assert (
        new_customer
        is sa.inspect(new_orders).relationships["customer"].mapper.class_
    )
    assert "email" in sa.inspect(new_customer).column_attrs
    assert "email" not in sa.inspect(customer).column_attrs
    with orm.Session(engine) as session:
        made = new_orders.create(
            session,
            customer=new_customer(name="Ada", email="a@example.org"),
            product=product(name="Demo"),
        )
        session.commit()
        stale = customer.read_one(session, name="Ada")

        assert (made.customer.email, "Ada") == ("a@example.org", stale.name)


def test_a_fetched_row_crosses_a_multiprocessing_queue(
    engine: sa.Engine,
) -> None:
    """A row put on a Queue arrives as its values, which rebuild a row."""
    Product = shop(engine).factory().get("product")
    with orm.Session(engine) as session:
        row = Product.create(session, name="Demo", description="Test")
        session.commit()
        values = row.as_dict()
        queue: multiprocessing.Queue[Any] = multiprocessing.Queue()
        try:
            queue.put(row)
            received = queue.get(timeout=10)
        finally:
            queue.close()
            queue.join_thread()

    assert values == received
    assert values == pickle.loads(pickle.dumps(row))
    assert received == Product(**received).as_dict()


def test_class_name_rule() -> None:
    """CamelCase from the table name, always a valid identifier."""
    assert [
        "Product",
        "OrderItems",
        "SalesOrders",
        "MixedCase",
        "Table2fa",
        "None_",
    ] == [
        class_name(name)
        for name in (
            "product",
            "order items",
            "sales.orders",
            "MixedCase",
            "2fa",
            "none",
        )
    ]


def test_colliding_class_names_get_a_hash(sqlite_url: URL) -> None:
    """order_items and "order items" get distinct, stable class names."""
    engine = sa.create_engine(sqlite_url)
    metadata = sa.MetaData()
    create(
        engine,
        *(
            sa.Table(
                name, metadata, sa.Column("id", sa.Integer, primary_key=True)
            )
            for name in ("order_items", "order items")
        ),
    )
    catalog = Catalog(engine)
    names = {
        table: catalog.factory().get(table).__name__
        for table in ("order_items", "order items")
    }
    again = catalog.factory().get("order items").__name__
    engine.dispose()

    assert 2 == len(set(names.values()))
    assert names["order items"] == again
    assert all(name.startswith("OrderItems_") for name in names.values())
