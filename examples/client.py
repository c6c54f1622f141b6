"""Use a running dynaconnd from an app: list, write, read, see a reload.

Start the daemon first (``make run``), then run this beside it
(``make client``).  It finds the socket through ``DYNACONN_SOCKET`` and
``DYNACONN_AUTHKEY_FILE``, or the daemon's defaults.
"""

from __future__ import annotations

import pathlib
import time

import sqlalchemy as sa

from magenta_dynaconn import DatabaseRegistry

SOURCE = pathlib.Path(__file__).resolve().parent.parent / "source.ini"
SCRATCH = "\n[example_scratch]\nsource = sqlite\nbase = ./scratch.sqlite3\n"


def main() -> None:
    """Run the tour."""
    registry = DatabaseRegistry.connect()
    print("databases:", registry.list_names())

    # The app owns its tables; the daemon only reflects them.
    with registry.session_scope("my_db") as session:
        session.execute(
            sa.text(
                "CREATE TABLE IF NOT EXISTS product ("
                " id INTEGER PRIMARY KEY, name TEXT, description TEXT)"
            )
        )

    Product = registry.get_db_instance("my_db", "product")
    with registry.session_scope("my_db") as session:
        product = Product.create(session, name="Demo", description="Test")
        session.flush()
        print("wrote product", product.id)
    with registry.session_scope("my_db") as session:
        print("products:", [p.as_dict() for p in Product.read_all(session)])

    # Save source.ini with one more section and wait for the client to
    # see it; then put the file back as it was.
    original = SOURCE.read_text()
    before = registry.generation
    started = time.monotonic()
    SOURCE.write_text(original + SCRATCH)
    try:
        while registry.generation == before:
            if time.monotonic() - started > 5:
                raise SystemExit("no new generation within 5 s")
            time.sleep(0.01)
        seconds = time.monotonic() - started
        print(
            f"generation {before} -> {registry.generation} after"
            f" {seconds * 1000:.0f} ms: {registry.list_names()}"
        )
    finally:
        SOURCE.write_text(original)
    registry.close()


if __name__ == "__main__":
    main()
