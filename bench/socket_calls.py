"""4. The socket: the client's calls against a bare managers server.

The floor is a plain ``multiprocessing.managers.BaseManager`` server on
a Unix socket, in a process of its own like the daemon, whose service
returns the very data the daemon returned (fetched first).  Its client
is the stdlib proxy.  Per-call latency takes turns in rounds; the
throughput runs 8 client processes at once against each server.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL

from bench._common import (
    Daemon,
    Row,
    ini_section,
    scratch_folder,
    spawn,
    summary,
)
from bench._schema import create_schema, target_table

if TYPE_CHECKING:
    from collections.abc import Callable

    from bench._common import Sizes

__all__ = ["CALLS", "run"]

#: The calls compared, as (method, arguments) on the service.
CALLS = ("generation", "names", "describe", "table_description")

_BARE_SERVER = """\
import json, sys
from multiprocessing.managers import BaseManager

with open(sys.argv[3], encoding="utf-8") as handle:
    data = json.load(handle)


class Service:
    def generation(self):
        return data["generation"]

    def names(self):
        return data["names"]

    def describe(self, name):
        return data["describe"]

    def table_description(self, name, table):
        return data["table_description"]


service = Service()


class Manager(BaseManager):
    pass


Manager.register("service", callable=lambda: service)
with open(sys.argv[2], "rb") as handle:
    key = handle.read()
server = Manager(address=sys.argv[1], authkey=key).get_server()
print("ready", flush=True)
server.serve_forever()
"""

_BARE_CLIENT = """\
from multiprocessing.managers import BaseManager


class Manager(BaseManager):
    pass


Manager.register("service")


def bare_calls(address, key, database, table):
    manager = Manager(address=address, authkey=key)
    manager.connect()
    proxy = manager.service()
    call = proxy._callmethod
    return {
        "generation": lambda: call("generation"),
        "names": lambda: call("names"),
        "describe": lambda: call("describe", (database,)),
        "table_description": lambda: call(
            "table_description", (database, table)
        ),
    }
"""

_THROUGHPUT_CHILD = (
    _BARE_CLIENT
    + """
import json, sys, time
mode, address, keyfile, database, table = sys.argv[1:6]
start_at, seconds = float(sys.argv[6]), float(sys.argv[7])
if mode == "bare":
    with open(keyfile, "rb") as handle:
        key = handle.read()
    calls = list(bare_calls(address, key, database, table).values())
else:
    from magenta_dynaconn import DatabaseRegistry
    registry = DatabaseRegistry.connect(address, keyfile)
    calls = [
        lambda: registry._call("generation"),
        lambda: registry._call("names"),
        lambda: registry._call("describe", database),
        lambda: registry._call("table_description", database, table),
    ]
for call in calls:
    call()
time.sleep(max(0.0, start_at - time.time()))
done = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    calls[done % 4]()
    done += 1
print(json.dumps({"calls": done, "seconds": seconds}))
"""
)


def _bare_calls(
    address: str, key: bytes, database: str, table: str
) -> dict[str, Callable[[], Any]]:
    namespace: dict[str, Any] = {}
    exec(_BARE_CLIENT, namespace)  # the same code the children run
    calls: dict[str, Callable[[], Any]] = namespace["bare_calls"](
        address, key, database, table
    )
    return calls


def _time_calls(call: Callable[[], Any], count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - started) / count


def _throughput(
    sizes: Sizes, mode: str, address: str, keyfile: str, table: str
) -> float:
    """Return calls per second of all clients together."""
    start_at = time.time() + 3.0 + 0.3 * sizes.throughput_clients
    children = [
        spawn(
            _THROUGHPUT_CHILD,
            mode,
            address,
            keyfile,
            "sock",
            table,
            str(start_at),
            str(sizes.throughput_seconds),
        )
        for _ in range(sizes.throughput_clients)
    ]
    total = 0.0
    for child in children:
        out, err = child.communicate(timeout=120)
        if child.returncode != 0:
            raise RuntimeError(f"throughput client failed:\n{err[-2000:]}")
        result = json.loads(out.strip().splitlines()[-1])
        total += result["calls"] / result["seconds"]
    return total


def run(sizes: Sizes) -> list[Row]:
    """Compare per-call latency and throughput with the bare floor."""
    with scratch_folder("sock") as folder:
        url = URL.create(
            "sqlite", database=os.path.join(folder, "sock.sqlite3")
        )
        create_schema(url, 20)
        table = target_table(20)
        with Daemon(folder, ini_section("sock", url)) as daemon:
            daemon.wait_ready()
            client = daemon.client()
            try:
                while len(client.tables("sock")) < 20:
                    time.sleep(0.2)
                daemon_calls: dict[str, Callable[[], Any]] = {
                    "generation": lambda: client._call("generation"),
                    "names": lambda: client._call("names"),
                    "describe": lambda: client._call("describe", "sock"),
                    "table_description": lambda: client._call(
                        "table_description", "sock", table
                    ),
                }
                data = {name: call() for name, call in daemon_calls.items()}
                data_path = os.path.join(folder, "bare.json")
                with open(data_path, "w", encoding="utf-8") as handle:
                    json.dump(data, handle)
                bare_address = os.path.join(folder, "bare.sock")
                bare = spawn(
                    _BARE_SERVER, bare_address, daemon.authkey, data_path
                )
                try:
                    if bare.stdout is None or "ready" not in (
                        bare.stdout.readline()
                    ):
                        raise RuntimeError("the bare server did not start")
                    with open(daemon.authkey, "rb") as handle:
                        key = handle.read()
                    bare_calls = _bare_calls(bare_address, key, "sock", table)
                    if {n: c() for n, c in bare_calls.items()} != data:
                        raise RuntimeError("the bare server's data differs")
                    latency = _latency(sizes, daemon_calls, bare_calls)
                    rates = {"daemon": [], "bare": []}
                    for mode in ("daemon", "bare", "bare", "daemon"):
                        address = (
                            daemon.socket if mode == "daemon" else bare_address
                        )
                        rates[mode].append(
                            _throughput(
                                sizes, mode, address, daemon.authkey, table
                            )
                        )
                finally:
                    bare.kill()
                    bare.communicate()
            finally:
                client.close()
    return _rows(sizes, latency, rates)


def _latency(
    sizes: Sizes,
    daemon_calls: dict[str, Callable[[], Any]],
    bare_calls: dict[str, Callable[[], Any]],
) -> dict[tuple[str, str], list[float]]:
    samples: dict[tuple[str, str], list[float]] = {}
    pairs = [
        (side, name)
        for name in CALLS
        for side in ("daemon", "bare")
        if sizes.socket_rounds
    ]
    sides = {"daemon": daemon_calls, "bare": bare_calls}
    for side, name in pairs:
        _time_calls(sides[side][name], 20)
    for _ in range(sizes.socket_rounds):
        random.shuffle(pairs)
        for side, name in pairs:
            samples.setdefault((side, name), []).append(
                _time_calls(sides[side][name], sizes.socket_calls)
            )
    return samples


def _rows(
    sizes: Sizes,
    latency: dict[tuple[str, str], list[float]],
    rates: dict[str, list[float]],
) -> list[Row]:
    rows = []
    for name in CALLS:
        for side in ("daemon", "bare"):
            values = [value * 1e6 for value in latency[side, name]]
            median, spread = summary(values)
            ratio = statistics.median(latency["daemon", name]) / (
                statistics.median(latency["bare", name])
            )
            rows.append(
                Row(
                    comparison="4. socket, per call",
                    variant=f"{name}: {side}",
                    value=median,
                    unit="us/call",
                    spread=spread,
                    trials=len(values),
                    ratio=f"{ratio:.2f}x bare" if side == "daemon" else "",
                    goal="<= 1.2x bare" if side == "daemon" else "",
                    met=ratio <= 1.2 if side == "daemon" else None,
                    note=f"{sizes.socket_calls} calls per round",
                )
            )
    bare = statistics.median(rates["bare"])
    for side in ("daemon", "bare"):
        value = statistics.median(rates[side])
        cost = bare / value
        rows.append(
            Row(
                comparison="4. socket, throughput",
                variant=f"{sizes.throughput_clients} client processes: {side}",
                value=value,
                unit="calls/s",
                spread="-".join(f"{rate:.0f}" for rate in sorted(rates[side])),
                trials=len(rates[side]),
                ratio=f"{cost:.2f}x bare" if side == "daemon" else "",
                goal="<= 1.2x bare (time per call)"
                if side == "daemon"
                else "",
                met=cost <= 1.2 if side == "daemon" else None,
                note=f"{sizes.throughput_seconds:g} s per run, mixed calls",
            )
        )
    return rows
