"""``dynaconnd``: the command that starts the daemon or checks a file."""

from __future__ import annotations

import argparse
import grp
import os
import sys
from typing import TYPE_CHECKING

from dynaconnd._version import __version__
from dynaconnd.config import load_config
from dynaconnd.durations import parse_duration
from dynaconnd.errors import ConfigError, DynaconnError
from dynaconnd.logs import configure_logging, get_logger
from dynaconnd.server import default_authkey_path, default_socket_path

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main", "run"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynaconnd",
        description=(
            "Own this machine's database connections: read source.ini,"
            " keep one engine per database, watch the file and serve the"
            " registry to local apps over a Unix socket."
        ),
    )
    parser.add_argument(
        "--config",
        default="source.ini",
        metavar="PATH",
        help="the file of database sections (default: ./source.ini)",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="the Unix socket to serve on (default: %(default)s)",
        default=default_socket_path(),
    )
    parser.add_argument(
        "--authkey-file",
        metavar="PATH",
        default=default_authkey_path(),
        help="the key clients must present; created if missing"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="PATH",
        default=os.environ.get("STATE_DIRECTORY") or None,
        help="where reflected schemas are cached"
        " (default: $STATE_DIRECTORY; no cache when unset)",
    )
    parser.add_argument(
        "--group",
        metavar="NAME",
        help="also serve members of this group (socket 0660, key 0640)",
    )
    parser.add_argument(
        "--allow-writes",
        action="store_true",
        help="let clients add, update and remove sections of source.ini",
    )
    parser.add_argument(
        "--debounce",
        default="150ms",
        metavar="DURATION",
        help="quiet time after a save before reloading (default: 150ms)",
    )
    parser.add_argument(
        "--poll",
        action="store_true",
        help="watch source.ini by polling instead of inotify",
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        help="json (default when not on a terminal) or console",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate --config, print every problem, exit 1 on any",
    )
    parser.add_argument(
        "--version", action="version", version=f"dynaconnd {__version__}"
    )
    return parser


def check(path: str) -> int:
    """Print every problem in the file at ``path``; return the exit code."""
    try:
        config = load_config(path)
    except ConfigError as error:
        for issue in error.issues:
            print(issue)
        print(f"{path}: rejected, nothing would be applied")
        return 1
    for issues in config.rejected.values():
        for issue in issues:
            print(issue)
    valid = len(config.specs)
    bad = len(config.rejected)
    print(f"{path}: {valid} valid, {bad} rejected")
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dynaconnd`` with ``argv``; return the exit status."""
    args = _parser().parse_args(argv)
    if args.check:
        return check(args.config)

    fmt = args.log_format or ("console" if sys.stdout.isatty() else "json")
    configure_logging(fmt=fmt, level=args.log_level)
    log = get_logger("main")
    try:
        options = _options(args)
    except (KeyError, ValueError) as error:
        log.error("daemon.bad_option", error=str(error))
        return 2

    from dynaconnd.daemon import Daemon

    try:
        status = Daemon(options).run()
    except (DynaconnError, OSError) as error:
        log.error(
            "daemon.failed",
            error_class=error.__class__.__name__,
            error=str(error),
        )
        status = 1
    return status


def _options(args: argparse.Namespace) -> DaemonOptions:
    from dynaconnd.daemon import DaemonOptions

    gid = grp.getgrnam(args.group).gr_gid if args.group else None
    return DaemonOptions(
        config=args.config,
        socket=os.path.abspath(args.socket),
        authkey_file=os.path.abspath(args.authkey_file),
        state_dir=args.state_dir,
        allowed_gid=gid,
        allow_writes=args.allow_writes,
        debounce=parse_duration(args.debounce),
        force_polling=args.poll,
    )


def run() -> None:
    """Run ``dynaconnd`` with ``sys.argv`` and exit with its status."""
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # A health probe stuck on a dead host lives in a worker thread that
    # nothing can interrupt, and the interpreter would join it at exit.
    # Everything is already closed and logged, so leave without waiting.
    os._exit(status)


if TYPE_CHECKING:
    from dynaconnd.daemon import DaemonOptions

if __name__ == "__main__":
    run()
