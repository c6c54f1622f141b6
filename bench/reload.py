"""3. Reload latency, through the daemon and inside the registry.

- From ``os.replace`` of source.ini to a client of the daemon seeing
  the new generation, with the debounce window beside it.
- ``Registry.apply`` of a 1,000-section file in which one section
  changed, in this process, counting the engines it builds.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from sqlalchemy.engine import URL

from bench._common import (
    Daemon,
    Row,
    ini_section,
    percentile,
    scratch_folder,
    summary,
)

if TYPE_CHECKING:
    import sqlalchemy as sa

    from bench._common import Sizes
    from dynaconnd.spec import DatabaseSpec

__all__ = ["DEBOUNCE_MS", "run"]

DEBOUNCE_MS = 150
#: The longest a client may take to see one save before the run fails.
_SEE_TIMEOUT = 10.0


def _sections(folder: str, count: int, *, variant: int) -> str:
    """Return ``count`` SQLite sections; ``variant`` changes the first."""
    text = []
    for index in range(count):
        url = URL.create(
            "sqlite", database=os.path.join(folder, f"db{index}.sqlite3")
        )
        extra = {"pool_recycle": 3600 + variant} if index == 0 else {}
        text.append(ini_section(f"db{index}", url, **extra))
    return "".join(text)


def _save(path: str, text: str) -> float:
    """Write ``text`` beside ``path`` and rename it over; return when."""
    temporary = path + ".new"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    started = time.perf_counter()
    os.replace(temporary, path)
    return started


def measure_latency(sizes: Sizes) -> list[float]:
    """Return seconds from each save to a client seeing it."""
    latencies: list[float] = []
    with scratch_folder("reload") as folder:
        texts = [_sections(folder, 3, variant=v) for v in (0, 1)]
        with Daemon(folder, texts[0], debounce=f"{DEBOUNCE_MS}ms") as daemon:
            daemon.wait_ready()
            client = daemon.client()
            try:
                for trial in range(sizes.reload_trials):
                    before = client.generation
                    started = _save(daemon.config, texts[(trial + 1) % 2])
                    deadline = started + _SEE_TIMEOUT
                    while client.generation == before:
                        if time.perf_counter() > deadline:
                            raise RuntimeError(
                                f"save {trial} never seen:\n" + daemon.tail()
                            )
                        time.sleep(0.0005)
                    latencies.append(time.perf_counter() - started)
            finally:
                client.close()
    return latencies


def measure_apply(sizes: Sizes) -> tuple[list[float], list[int], list[float]]:
    """Time ``Registry.apply`` with one of many sections changed.

    Returns the apply times, the engines built by each apply, and the
    times to read and validate the file (what a reload also pays).
    """
    from dynaconnd.config import load_config
    from dynaconnd.engines import build_engine
    from dynaconnd.registry import Registry

    built: list[int] = [0]

    def counting(spec: DatabaseSpec) -> sa.Engine:
        built[0] += 1
        return build_engine(spec)

    applies: list[float] = []
    engines: list[int] = []
    loads: list[float] = []
    with scratch_folder("apply") as folder:
        path = os.path.join(folder, "source.ini")
        registry = Registry(engine_factory=counting, drain_timeout=1.0)
        try:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(
                    _sections(folder, sizes.apply_sections, variant=0)
                )
            registry.apply(load_config(path))
            for trial in range(sizes.apply_trials):
                _save(
                    path,
                    _sections(
                        folder, sizes.apply_sections, variant=(trial + 1) % 2
                    ),
                )
                started = time.perf_counter()
                config = load_config(path)
                loaded = time.perf_counter()
                built[0] = 0
                outcome = registry.apply(config)
                applies.append(time.perf_counter() - loaded)
                loads.append(loaded - started)
                engines.append(built[0])
                if list(outcome.changed) != ["db0"]:
                    raise RuntimeError(f"unexpected reload {outcome}")
        finally:
            registry.close()
    return applies, engines, loads


def run(sizes: Sizes) -> list[Row]:
    """Measure both reload figures and return their rows."""
    latencies = [value * 1000 for value in measure_latency(sizes)]
    p50 = percentile(latencies, 0.5)
    p99 = percentile(latencies, 0.99)
    applies, engines, loads = measure_apply(sizes)
    apply_ms = [value * 1000 for value in applies]
    load_ms = [value * 1000 for value in loads]
    median, spread = summary(latencies)
    apply_median, apply_spread = summary(apply_ms)
    load_median, load_spread = summary(load_ms)
    one_engine = set(engines) == {1}
    return [
        Row(
            comparison="3. reload",
            variant="save -> client sees generation, p50",
            value=p50,
            unit="ms",
            spread=spread,
            trials=len(latencies),
            ratio=f"window {DEBOUNCE_MS} ms",
            goal=f"p50 <= {DEBOUNCE_MS + 30} ms",
            met=p50 <= DEBOUNCE_MS + 30,
            note=f"median {median:.1f} ms",
        ),
        Row(
            comparison="3. reload",
            variant="save -> client sees generation, p99",
            value=p99,
            unit="ms",
            trials=len(latencies),
            ratio=f"window {DEBOUNCE_MS} ms",
            goal=f"p99 <= {DEBOUNCE_MS + 100} ms",
            met=p99 <= DEBOUNCE_MS + 100,
            note=f"max {max(latencies):.1f} ms",
        ),
        Row(
            comparison="3. reload",
            variant=f"Registry.apply, {sizes.apply_sections} sections,"
            " 1 changed",
            value=apply_median,
            unit="ms",
            spread=apply_spread,
            trials=len(apply_ms),
            goal="<= 50 ms, exactly 1 engine built",
            met=apply_median <= 50 and one_engine,
            note=f"engines built per apply: {sorted(set(engines))}",
        ),
        Row(
            comparison="3. reload",
            variant=f"load_config, {sizes.apply_sections} sections",
            value=load_median,
            unit="ms",
            spread=load_spread,
            trials=len(load_ms),
            note="read + validate, paid by every reload before apply",
        ),
    ]
