"""Structured logging: one JSON object per line, secrets redacted.

Event names are lowercase and dotted (``reload.applied``).  Redaction is
a safety net: code never logs a secret on purpose, and this processor
masks any known secret, and any password inside a URL, that slips into
an event anyway.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import TYPE_CHECKING, Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer

if TYPE_CHECKING:
    from collections.abc import MutableMapping

__all__ = [
    "MASK",
    "configure_logging",
    "forget_secret",
    "get_logger",
    "quiet_library_defaults",
    "redact",
    "remember_secret",
]

MASK = "***"

# scheme://user:password@host -> keep user, mask password.
_URL_PASSWORD = re.compile(
    r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s]*:)[^@\s]*@"
)
# ?password=... or &sslpassword=... in a URL's query string.
_QUERY_PASSWORD = re.compile(
    r"(?P<head>[?&][^=&\s]*pass[^=&\s]*=)[^&\s]*", re.IGNORECASE
)

_secrets_lock = threading.Lock()
_secrets: set[str] = set()


def remember_secret(secret: str | bytes | None) -> None:
    """Add ``secret`` to the values every log event is scrubbed of."""
    if not secret:
        return
    text = secret.hex() if isinstance(secret, bytes) else secret
    # Very short values would mask ordinary words; they are still never
    # logged on purpose.
    if len(text) >= 4:
        with _secrets_lock:
            _secrets.add(text)


def forget_secret(secret: str | None) -> None:
    """Stop scrubbing ``secret``; used when a password is rotated away."""
    if secret:
        with _secrets_lock:
            _secrets.discard(secret)


def redact(text: str) -> str:
    """Return ``text`` with URL passwords and known secrets masked."""
    text = _URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)
    text = _QUERY_PASSWORD.sub(rf"\g<head>{MASK}", text)
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(item) for item in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    return redact(str(value))


def _redaction_processor(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    return {key: _redact_value(value) for key, value in event.items()}


def configure_logging(
    *, fmt: str = "json", level: str = "info", stream: Any = None
) -> None:
    """Send structured events to ``stream`` (standard output by default).

    ``fmt`` is ``json`` (one object per line, for journald and monitoring)
    or ``console`` (readable on a terminal).
    """
    numeric = logging.getLevelNamesMapping()[level.upper()]
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        exceptions: list[Any] = []
    else:
        renderer = structlog.processors.JSONRenderer()
        exceptions = [
            structlog.processors.ExceptionRenderer(
                ExceptionDictTransformer(show_locals=False)
            )
        ]
    output = stream or sys.stdout
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            *exceptions,
            _redaction_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(output),
        cache_logger_on_first_use=False,
    )

    # Libraries (APScheduler, watchdog) log through the standard library;
    # render their records as the same one-object-per-line events.
    handler = logging.StreamHandler(output)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                stamp,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _redaction_processor,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(numeric, logging.WARNING))
    # The scheduler's listener already logs skipped and missed runs as
    # job.skipped and job.missed; keep APScheduler's own copies out.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def quiet_library_defaults() -> None:
    """Keep an app's output clean when it never configured structlog.

    structlog's own defaults print every event, debug included, to
    standard output.  Inside an app, this library should only speak up
    about problems, and on standard error; an app that configures
    structlog itself (before or after) decides instead.
    """
    if structlog.is_configured():
        return
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def get_logger(name: str) -> Any:
    """Return a structured logger that tags events with ``component=name``."""
    return structlog.get_logger(component=name)
