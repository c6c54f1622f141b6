"""``python -m bench``: run every comparison, print and save the table."""

from __future__ import annotations

import argparse
import datetime
import sys
import time

from bench import (
    coldstart,
    hotpath,
    reload,
    scale,
    socket_calls,
    underload,
)
from bench._common import Row, Sizes
from bench._report import machine, render_markdown, render_table

#: The comparisons in the order they run and print.
COMPARISONS = {
    "coldstart": coldstart.run,
    "hotpath": hotpath.run,
    "reload": reload.run,
    "socket": socket_calls.run,
    "scale": scale.run,
    "underload": underload.run,
}

FULL = Sizes(
    quick=False,
    cold_trials={
        "daemon": 7,
        "automap@2000": 5,
        "reflect one@2000": 5,
        "one by one@2000": 3,
    },
)


def goals_section(rows: list[Row]) -> str:
    """Return the goals, each met or missed with its measured figure."""
    lines = ["## Goals", ""]
    for row in rows:
        if row.met is None:
            continue
        verdict = "met" if row.met else "MISSED"
        figure = f"{row.value:.4g} {row.unit}"
        if row.ratio:
            figure += f", {row.ratio}"
        lines.append(
            f"- {verdict}: {row.comparison}, {row.variant}: goal"
            f" {row.goal}; measured {figure}."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the comparisons named (all by default) and write the report."""
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(COMPARISONS),
        help="run only this comparison (repeatable)",
    )
    parser.add_argument(
        "--output",
        default="BENCHMARKS.md",
        help="where to write the report (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    from dynaconnd.logs import configure_logging

    # The bench process hosts clients; their routine events are noise.
    configure_logging(level="warning", stream=sys.stderr)
    started_at = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    rows = []
    for name, run in COMPARISONS.items():
        if args.only and name not in args.only:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.extend(run(FULL))
    seconds = time.monotonic() - started

    table = render_table(rows)
    print(table)
    notes = goals_section(rows)
    command = " ".join(["python -m bench", *(argv or sys.argv[1:])])
    report = render_markdown(
        rows,
        command=command.strip(),
        started=started_at,
        seconds=seconds,
        facts=machine(),
        notes=notes,
    )
    with open(args.output, "w", encoding="utf-8") as handle:
        handle.write(report)
    print(
        f"wrote {args.output} after {seconds / 60:.1f} minutes",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
