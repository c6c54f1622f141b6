"""Generated schemas: many tables of mixed columns, half with a key."""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["create_schema", "table_name", "target_table"]

_BATCH = 200


def table_name(index: int) -> str:
    """Return the name of table number ``index``."""
    return f"t{index:05d}"


def target_table(count: int) -> str:
    """Return the table every cold-start variant asks for.

    The last one: odd, so it has a foreign key and its class pulls in a
    relationship to the table it refers to.
    """
    last = count - 1 if (count - 1) % 2 else count - 2
    return table_name(last)


def _metadata(count: int) -> sa.MetaData:
    """Describe ``count`` tables: about 8 columns each, odd ones keyed."""
    metadata = sa.MetaData()
    for index in range(count):
        columns: list[sa.Column[object] | sa.Constraint] = [
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", sa.String(80), nullable=False),
            sa.Column("quantity", sa.Integer, server_default="0"),
            sa.Column("price", sa.Numeric(12, 2)),
            sa.Column("created_at", sa.DateTime),
            sa.Column("is_active", sa.Boolean, server_default=sa.true()),
            sa.Column("note", sa.Text),
        ]
        if index % 2:
            # Odd tables refer to an even one: the class of an odd table
            # needs two tables, never a long chain.
            columns.append(
                sa.Column(
                    "parent_id",
                    sa.Integer,
                    sa.ForeignKey(f"{table_name(index - 1)}.id"),
                )
            )
        else:
            columns.append(sa.Column("ratio", sa.Float))
        sa.Table(table_name(index), metadata, *columns)
    return metadata


def create_schema(url: sa.URL | str, count: int) -> None:
    """Create ``count`` generated tables in the empty database ``url``."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        tables = _metadata(count).sorted_tables
        # One transaction per batch: PostgreSQL locks every table a
        # transaction creates, and its lock table is finite.
        for start in range(0, len(tables), _BATCH):
            with engine.begin() as connection:
                for table in tables[start : start + _BATCH]:
                    table.create(connection, checkfirst=False)
    finally:
        engine.dispose()
