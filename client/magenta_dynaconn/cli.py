"""``dynaconn``: the operator's command line for a running dynaconnd.

Every command is one or two calls to the daemon's service over its
socket.  Exit status: 0 when all is well, 1 for a rejected file or
section, an unknown database or a failed probe, 2 when the daemon or
its key cannot be reached (and for usage errors, as argparse does).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from multiprocessing import AuthenticationError
from typing import TYPE_CHECKING, Any

from dynaconnd._version import __version__
from dynaconnd.errors import (
    ConfigError,
    DynaconnError,
    ProtocolMismatchError,
    UnknownDatabaseError,
)
from dynaconnd.protocol import PROTOCOL_VERSION, check_protocol
from dynaconnd.server import (
    default_authkey_path,
    default_socket_path,
    read_authkey,
)
from magenta_dynaconn._remote import (
    CALL_TIMEOUT,
    CONNECT_TIMEOUT,
    RELOAD_TIMEOUT,
    _Channel,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

__all__ = ["main"]

OK = 0
FAILED = 1
UNREACHABLE = 2


class _Unreachable(Exception):
    """The daemon or its key cannot be had; the message says why."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message + hint)
        self.message = message


class _Daemon:
    """One connection to dynaconnd, opened for one command."""

    def __init__(self, socket_path: str, authkey_file: str) -> None:
        self.socket_path = socket_path
        try:
            authkey = read_authkey(authkey_file)
        except (OSError, DynaconnError) as error:
            # The runtime folder, key included, goes with a stopped daemon.
            hint = (
                "; is dynaconnd running?"
                if isinstance(error, FileNotFoundError)
                else ""
            )
            raise _Unreachable(
                f"cannot read the authkey {authkey_file}: {_reason(error)}",
                hint=hint,
            ) from None
        try:
            self._channel = _Channel(
                socket_path, authkey, timeout=CONNECT_TIMEOUT
            )
            hello = self._channel.call(
                "hello", (PROTOCOL_VERSION,), CONNECT_TIMEOUT
            )
        except (OSError, EOFError, AuthenticationError) as error:
            raise _Unreachable(
                f"cannot reach dynaconnd at {socket_path}: {_reason(error)}",
                hint="; is it running?",
            ) from None
        try:
            check_protocol(hello.get("protocol"), socket_path=socket_path)
        except ProtocolMismatchError as error:
            self.close()
            raise _Unreachable(str(error)) from None
        self.generation = int(hello["generation"])

    def call(
        self, method: str, *args: Any, timeout: float = CALL_TIMEOUT
    ) -> Any:
        """Call ``method`` on the daemon's service."""
        try:
            return self._channel.call(method, args, timeout)
        except DynaconnError:
            # The service's own answer, though some are OSErrors too.
            raise
        except (OSError, EOFError) as error:
            raise _Unreachable(
                f"lost dynaconnd at {self.socket_path} during {method}:"
                f" {_reason(error)}"
            ) from None

    def close(self) -> None:
        """Close the connection."""
        self._channel.close()


def _reason(error: BaseException) -> str:
    if isinstance(error, AuthenticationError):
        return "the authkey was refused"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or error.__class__.__name__


# -- formatting ------------------------------------------------------------


def _emit(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _names(names: Iterable[str]) -> str:
    return ", ".join(names) or "-"


def _issue(issue: dict[str, Any]) -> str:
    where = str(issue.get("file"))
    if issue.get("line") is not None:
        where += f":{issue['line']}"
    if issue.get("section") is not None:
        where += f" [{issue['section']}]"
    if issue.get("key") is not None:
        where += f" {issue['key']}"
    return f"{where}: {issue.get('message')}"


def _rejections(result: dict[str, Any]) -> list[str]:
    issues = list(result.get("file_issues", []))
    for found in result.get("rejected", {}).values():
        issues.extend(found)
    return [_issue(issue) for issue in issues]


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _table(header: Sequence[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(cell) for cell in column)
        for column in zip(header, *rows, strict=True)
    ]
    lines = [header, *rows]
    return "\n".join(
        "  ".join(
            cell.ljust(width) for cell, width in zip(line, widths, strict=True)
        ).rstrip()
        for line in lines
    )


def _flatten(data: dict[str, Any], prefix: str = "") -> list[str]:
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.extend(_flatten(value, f"{prefix}{key}."))
        else:
            if isinstance(value, list):
                value = ", ".join(value) or None
            lines.append(f"{prefix}{key}: {'-' if value is None else value}")
    return lines


# -- commands --------------------------------------------------------------


def _status(daemon: _Daemon, args: argparse.Namespace) -> int:
    # specs() is one consistent snapshot of names and generations; its
    # connection specs are dropped here, unread.
    snapshot = daemon.call("specs")
    health = daemon.call("health")
    rows = []
    for name in snapshot["specs"]:
        record = health.get(name, {})
        rows.append(
            {
                "name": name,
                "state": record.get("state", "unknown"),
                "latency_ms": record.get("last_latency_ms"),
                "since": record.get("since"),
                "consecutive_failures": record.get("consecutive_failures", 0),
                "last_error": record.get("last_error"),
                "schema_generation": snapshot["schema_generations"].get(name),
            }
        )
    if args.json:
        _emit({"generation": snapshot["generation"], "databases": rows})
        return OK

    print(
        f"registry generation {snapshot['generation']}, {len(rows)} databases"
    )
    header = ("DATABASE", "STATE", "LATENCY MS", "SINCE", "FAILURES", "SCHEMA")
    cells = [
        [
            row["name"],
            row["state"],
            "-" if row["latency_ms"] is None else f"{row['latency_ms']:.1f}",
            _when(row["since"]),
            str(row["consecutive_failures"]),
            str(row["schema_generation"]),
        ]
        for row in rows
    ]
    if cells:
        print(_table(header, cells))
    return OK


def _ls(daemon: _Daemon, args: argparse.Namespace) -> int:
    names = daemon.call("names")
    if args.json:
        _emit(names)
    else:
        for name in names:
            print(name)
    return OK


def _tables(daemon: _Daemon, args: argparse.Namespace) -> int:
    tables = daemon.call("tables", args.name)
    if args.json:
        _emit(tables)
    else:
        for table in tables:
            print(table)
    return OK


def _describe(daemon: _Daemon, args: argparse.Namespace) -> int:
    # The daemon's description carries the URL with its password masked
    # and no password field at all.
    described = daemon.call("describe", args.name)
    if args.json:
        _emit(described)
    else:
        print("\n".join(_flatten(described)))
    return OK


def _reload(daemon: _Daemon, args: argparse.Namespace) -> int:
    outcome = daemon.call("reload", timeout=RELOAD_TIMEOUT)
    rejections = _rejections(outcome)
    if args.json:
        _emit(outcome)
    else:
        verb = "applied" if outcome["applied"] else "rejected, nothing applied"
        print(
            f"reload {verb}: generation {outcome['previous_generation']}"
            f" -> {outcome['generation']}"
        )
        print(f"added: {_names(outcome['added'])}")
        print(f"changed: {_names(outcome['changed'])}")
        print(f"removed: {_names(outcome['removed'])}")
        print(f"unchanged: {_names(outcome['unchanged'])}")
        if outcome["kept"]:
            print(f"kept as before: {_names(outcome['kept'])}")
        for name, error in outcome["unreachable"].items():
            print(f"unreachable: {name}: {error}")
        for line in rejections:
            print(f"rejected: {line}")
    return FAILED if rejections else OK


def _check(args: argparse.Namespace) -> int:
    try:
        with open(args.file, "rb") as handle:
            text = handle.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        _fail(f"cannot read {args.file}: {_reason(error)}")
        return FAILED
    try:
        daemon = _Daemon(args.socket, args.authkey_file)
    except _Unreachable as error:
        return _check_alone(args, error.message)
    try:
        result = daemon.call("check", text, timeout=RELOAD_TIMEOUT)
    finally:
        daemon.close()

    rejections = _rejections(result)
    if args.json:
        _emit({"daemon": args.socket, **result})
    else:
        print(f"{args.file} against dynaconnd at {args.socket}:")
        print(f"would add: {_names(result['added'])}")
        print(f"would change: {_names(result['changed'])}")
        print(f"would remove: {_names(result['removed'])}")
        print(f"would keep: {_names(result['unchanged'])}")
        if result["kept"]:
            print(f"would keep as before: {_names(result['kept'])}")
        for line in rejections:
            print(f"rejected: {line}")
        if result["file_issues"]:
            print(f"{args.file}: rejected, nothing would be applied")
    return FAILED if rejections else OK


def _check_alone(args: argparse.Namespace, why: str) -> int:
    """Validate FILE in this process, as ``dynaconnd --check`` does."""
    from dynaconnd.config import load_config

    _fail(f"{why}; checking {args.file} alone, as dynaconnd --check does")
    try:
        config = load_config(args.file)
    except ConfigError as error:
        result: dict[str, Any] = {
            "valid": [],
            "rejected": {},
            "file_issues": [issue.as_dict() for issue in error.issues],
        }
    else:
        result = {
            "valid": list(config.specs),
            "rejected": {
                name: [issue.as_dict() for issue in issues]
                for name, issues in config.rejected.items()
            },
            "file_issues": [],
        }
    rejections = _rejections(result)
    if args.json:
        _emit({"daemon": None, "ok": not rejections, **result})
    else:
        print(f"{args.file} alone, without a running registry:")
        print(f"valid: {_names(result['valid'])}")
        for line in rejections:
            print(f"rejected: {line}")
    return FAILED if rejections else OK


def _health(daemon: _Daemon, args: argparse.Namespace) -> int:
    records = daemon.call("health")
    if args.name not in records:
        # The registry's own error names close matches.
        daemon.call("describe", args.name)
    record = records.get(args.name, {"state": "unknown"})
    if args.json:
        _emit(record)
        return OK
    history = record.pop("history", [])
    record["since"] = _when(record.get("since"))
    record["last_check"] = _when(record.get("last_check"))
    record["last_error_at"] = _when(record.get("last_error_at"))
    print("\n".join(_flatten(record)))
    for result in history:
        mark = "ok" if result["ok"] else f"{result['error_class']}"
        print(
            f"  {_when(result['checked_at'])}"
            f"  {result['latency_ms']:.1f} ms  {mark}"
        )
    return OK


def _ping(daemon: _Daemon, args: argparse.Namespace) -> int:
    result = daemon.call("ping", args.name)
    if args.json:
        _emit(result)
    elif result["ok"]:
        print(
            f"{args.name}: ok in {result['latency_ms']:.1f} ms"
            f" ({result['state']})"
        )
    else:
        print(
            f"{args.name}: failed after {result['latency_ms']:.1f} ms:"
            f" {result['error_class']}: {result['error']}"
            f" ({result['state']})"
        )
    return OK if result["ok"] else FAILED


# -- the parser ------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynaconn",
        description="Ask the running dynaconnd about its databases.",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="the daemon's socket (default: $DYNACONN_SOCKET, else"
        " dynaconnd.sock in the runtime folder)",
    )
    parser.add_argument(
        "--authkey-file",
        metavar="PATH",
        help="the daemon's key (default: $DYNACONN_AUTHKEY_FILE, else"
        " authkey in the runtime folder)",
    )
    parser.add_argument(
        "--version", action="version", version=f"dynaconn {__version__}"
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument(
        "--json", action="store_true", help="print JSON for scripts"
    )
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("name", metavar="NAME", help="a database's name")

    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND"
    )
    for command, parents, handler, text in (
        ("status", [], _status, "every database's state and generation"),
        ("ls", [], _ls, "the database names, one per line"),
        ("tables", [named], _tables, "the tables and views of NAME"),
        ("describe", [named], _describe, "NAME's settings, password masked"),
        ("reload", [], _reload, "read source.ini now; print what changed"),
        ("health", [named], _health, "NAME's health record and history"),
        ("ping", [named], _ping, "check NAME now"),
    ):
        sub = commands.add_parser(
            command, parents=[as_json, *parents], help=text
        )
        sub.set_defaults(handler=handler)
    check = commands.add_parser(
        "check",
        parents=[as_json],
        help="dry-run FILE as source.ini against the running registry",
    )
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=None)
    return parser


def _fail(message: str) -> None:
    print(f"dynaconn: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dynaconn`` with ``argv``; return the exit status."""
    args = _parser().parse_args(argv)
    args.socket = args.socket or default_socket_path()
    args.authkey_file = args.authkey_file or default_authkey_path()
    handler: Callable[[_Daemon, argparse.Namespace], int] = args.handler
    try:
        if args.command == "check":
            return _check(args)
        daemon = _Daemon(args.socket, args.authkey_file)
        try:
            return handler(daemon, args)
        finally:
            daemon.close()
    except _Unreachable as error:
        _fail(str(error))
        return UNREACHABLE
    except UnknownDatabaseError as error:
        _fail(str(error))
        return FAILED
