"""Small runs of every benchmark, so the bench code cannot rot.

They check what each benchmark counts (trials, rows, engines, errors),
never how fast anything was.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import pytest

from bench import coldstart, hotpath, reload, scale, socket_calls, underload
from bench._common import Sizes
from bench._report import render_markdown, render_table

if TYPE_CHECKING:
    from bench._common import Row

QUICK = Sizes(
    quick=True,
    table_counts=(4, 8),
    cold_trials={"daemon": 1, "automap": 1, "reflect one": 1, "one by one": 1},
    hot_rounds=2,
    hot_ops=5,
    reload_trials=3,
    apply_sections=50,
    apply_trials=2,
    socket_rounds=2,
    socket_calls=5,
    throughput_clients=2,
    throughput_seconds=0.3,
    scale_databases=24,
    scale_unreachable=4,
    scale_warmup=1.5,
    scale_window=2.0,
    lateness_window=2.5,
    scale_interval=0.5,
    load_clients=2,
    load_rewrites=3,
)


def _by_variant(rows: list[Row]) -> dict[str, Row]:
    return {f"{row.comparison} / {row.variant}": row for row in rows}


@pytest.fixture(autouse=True)
def _servers_or_skip(pg_url: object, mysql_url: object) -> None:
    """Skip (or fail in CI) when PostgreSQL or MariaDB is missing."""


def test_coldstart_runs_every_variant_at_every_size() -> None:
    """Each variant gives one row per table count, with its trials."""
    sizes = dataclasses.replace(QUICK, backends=("sqlite",))

    rows = coldstart.run(sizes)

    assert len(coldstart.VARIANTS) * len(sizes.table_counts) == len(rows)
    assert all(1 == row.trials for row in rows)


def test_coldstart_runs_on_postgresql() -> None:
    """The main target, PostgreSQL, gives the same rows as SQLite."""
    sizes = dataclasses.replace(
        QUICK, backends=("postgresql",), table_counts=(4,)
    )

    rows = coldstart.run(sizes)

    assert ["1. cold start, postgresql"] == sorted(
        {row.comparison for row in rows}
    )
    assert len(coldstart.VARIANTS) == len(rows)


def test_hotpath_times_three_variants_per_backend() -> None:
    """Bare, embedded and daemon each have every round on both backends."""
    rows = hotpath.run(QUICK)

    assert 6 == len(rows)
    assert {QUICK.hot_rounds} == {row.trials for row in rows}


def test_reload_sees_every_save_and_builds_one_engine() -> None:
    """Every save is seen, and an apply builds exactly one engine."""
    rows = _by_variant(reload.run(QUICK))

    p50 = rows["3. reload / save -> client sees generation, p50"]
    apply = rows["3. reload / Registry.apply, 50 sections, 1 changed"]
    assert QUICK.reload_trials == p50.trials
    assert "engines built per apply: [1]" == apply.note


def test_measure_apply_counts_engines_built() -> None:
    """Each apply of the file with one section changed builds one engine."""
    applies, engines, loads = reload.measure_apply(QUICK)

    assert [1] * QUICK.apply_trials == engines
    assert QUICK.apply_trials == len(applies) == len(loads)


def test_socket_compares_every_call_with_the_bare_floor() -> None:
    """Every call has a daemon and a bare row, plus both throughputs."""
    rows = socket_calls.run(QUICK)

    per_call = [row for row in rows if row.comparison.endswith("per call")]
    throughput = [row for row in rows if row.comparison.endswith("put")]
    assert 2 * len(socket_calls.CALLS) == len(per_call)
    assert 2 == len(throughput)
    assert all(row.value > 0 for row in throughput)


def test_scale_reports_cpu_rss_and_lateness() -> None:
    """The steady run sees databases up; the lateness run has samples."""
    rows = scale.run(QUICK)

    cpu, rss, late = rows
    assert cpu.note.endswith(" up")
    assert not cpu.note.endswith(" 0 up")
    assert rss.value > 0
    assert late.trials > 0


def test_lateness_is_measured_from_due_time_to_probe_start() -> None:
    """A check that started 0.25 s after its due time is 0.25 s late."""
    events = [
        {
            "event": "health.checked",
            "database": "a",
            "timestamp": "2026-01-01T00:00:00.000000Z",
            "latency_ms": 1.0,
            "next_in": 1.0,
        },
        {
            "event": "health.checked",
            "database": "a",
            "timestamp": "2026-01-01T00:00:01.350000Z",
            "latency_ms": 100.0,
            "next_in": 1.0,
        },
    ]

    late = scale.lateness(events, {"a"}, since=0.0)

    assert [0.25] == [round(value, 6) for value in late]


def test_underload_loses_and_fails_nothing() -> None:
    """Clients commit through reloads with no failure and no lost row."""
    failed, lost = underload.run(QUICK)

    assert 0 == failed.value, failed.note
    assert 0 == lost.value, lost.note
    assert lost.trials > 0


def test_report_renders_every_row() -> None:
    """The Markdown report holds one table line per row."""
    import datetime

    from bench._common import Row

    rows = [
        Row("c", "v1", 1.5, "ms", "1.0-2.0", 3, "1.0x", "<= 2", True),
        Row("c", "v2", 150.0, "ms"),
    ]

    text = render_markdown(
        rows,
        command="python -m bench",
        started=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        seconds=60.0,
        facts={"CPUs": "2"},
        notes="",
    )

    assert render_table(rows) in text
    assert 4 == render_table(rows).count("\n") + 1
