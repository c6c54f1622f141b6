"""The results table, the machine it ran on, and BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datetime
    from collections.abc import Sequence

    from bench._common import Row

__all__ = ["machine", "render_markdown", "render_table"]

_COLUMNS = (
    "comparison",
    "variant",
    "median",
    "p10-p90",
    "n",
    "ratio",
    "goal",
    "met",
    "note",
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _server_version(command: list[str]) -> str:
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=10, check=False
        )
    except OSError as error:
        return f"unavailable ({error.__class__.__name__})"
    return result.stdout.strip() or "unavailable"


def machine() -> dict[str, str]:
    """Describe this machine and the versions the bench ran with."""
    import sqlalchemy as sa

    from bench._common import MYSQL_ADMIN, PG_ADMIN

    def version(url: sa.URL, query: str) -> str:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as connection:
                return str(connection.execute(sa.text(query)).scalar_one())
        except sa.exc.DBAPIError as error:
            return f"unavailable ({error.__class__.__name__})"
        finally:
            engine.dispose()

    return {
        "CPUs": str(os.cpu_count()),
        "CPU model": _cpu_model(),
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "SQLAlchemy": sa.__version__,
        "PostgreSQL": version(PG_ADMIN, "SHOW server_version"),
        "MariaDB": version(MYSQL_ADMIN, "SELECT VERSION()"),
        "SQLite": _sqlite_version(),
    }


def _sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version


def _cells(row: Row) -> list[str]:
    digits = 0 if abs(row.value) >= 100 else 1 if abs(row.value) >= 10 else 2
    met = "" if row.met is None else "yes" if row.met else "NO"
    return [
        row.comparison,
        row.variant,
        f"{row.value:.{digits}f} {row.unit}",
        row.spread,
        str(row.trials) if row.trials else "",
        row.ratio,
        row.goal,
        met,
        row.note,
    ]


def render_table(rows: Sequence[Row]) -> str:
    """Return the rows as a Markdown table (also readable as text)."""
    lines = [
        "| " + " | ".join(_COLUMNS) + " |",
        "| " + " | ".join("---" for _ in _COLUMNS) + " |",
    ]
    for row in rows:
        cells = [cell.replace("|", "/") for cell in _cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(
    rows: Sequence[Row],
    *,
    command: str,
    started: datetime.datetime,
    seconds: float,
    facts: dict[str, str],
    notes: str,
) -> str:
    """Return the whole BENCHMARKS.md for one run."""
    machine_lines = "\n".join(
        f"- {key}: {value}" for key, value in facts.items()
    )
    goals = [row for row in rows if row.met is not None]
    missed = [row for row in goals if not row.met]
    return f"""# Benchmarks

Written by `{command}` on {started:%Y-%m-%d %H:%M} UTC; the run took
{seconds / 60:.1f} minutes.  Every figure below comes from that one
run, with the variants of each comparison measured side by side.

## Machine

{machine_lines}

The cores are shared with other work: read medians and ratios, not
single times.

## Results

Medians, with the 10th-90th percentile range over `n` trials.
{len(goals) - len(missed)} of {len(goals)} goals met.

{render_table(rows)}

{notes}
"""
