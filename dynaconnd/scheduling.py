"""The APScheduler set-up the daemon's periodic jobs run on.

Job defaults are explicit, so a frozen or overloaded daemon behaves the
same whatever APScheduler's defaults become: a late run still happens
within the grace time, late runs of one job collapse into one, and a
job never overlaps itself.  Jobs catch what they expect; the listener
only reports what slipped through, and runs that were really missed.
"""

from __future__ import annotations

import contextlib
import datetime
import math
from typing import TYPE_CHECKING, Any

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_STOPPED
from apscheduler.triggers.interval import IntervalTrigger

from dynaconnd.logs import get_logger, redact

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "DEFAULT_MAX_WORKERS",
    "DEFAULT_MISFIRE_GRACE_TIME",
    "SCHEDULER_THREAD_NAME",
    "WORKER_THREAD_PREFIX",
    "add_database_job",
    "arm_job",
    "make_scheduler",
    "remove_job",
]

DEFAULT_MAX_WORKERS = 8
DEFAULT_MISFIRE_GRACE_TIME = 30.0
SCHEDULER_THREAD_NAME = "dynaconn-scheduler"
WORKER_THREAD_PREFIX = "dynaconn-job"

_log = get_logger("scheduling")


class _Scheduler(BackgroundScheduler):  # type: ignore[misc]
    """A background scheduler whose own thread carries our name."""

    def start(self, *args: Any, **kwargs: Any) -> None:
        """Start the scheduler thread, named ``dynaconn-scheduler``."""
        super().start(*args, **kwargs)
        # APScheduler hard-codes the name; renaming a started thread is
        # harmless and lets the leak check in the tests see it.
        self._thread.name = SCHEDULER_THREAD_NAME

    def _process_jobs(self) -> float | None:
        """Run one round of the loop; a round cut short by shutdown ends."""
        try:
            wait_seconds: float | None = super()._process_jobs()
        except JobLookupError:
            # shutdown() marks the scheduler stopped before it takes the
            # job store lock, so a round that was removing a finished job
            # looks for it among pending jobs and fails.  Nothing is lost:
            # the loop is ending anyway.
            if self.state == STATE_STOPPED:
                return None
            raise
        return wait_seconds


def _iso(moment: datetime.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _on_event(event: Any) -> None:
    """Log one missed, skipped or failed run as a structured event."""
    if event.code == EVENT_JOB_MISSED:
        _log.warning(
            "job.missed",
            job_id=event.job_id,
            scheduled_at=_iso(event.scheduled_run_time),
        )
    elif event.code == EVENT_JOB_MAX_INSTANCES:
        _log.warning(
            "job.skipped",
            job_id=event.job_id,
            reason="previous run still going",
            scheduled_at=[
                _iso(moment) for moment in event.scheduled_run_times
            ],
        )
    elif event.code == EVENT_JOB_ERROR:
        error = event.exception
        _log.error(
            "job.failed",
            job_id=event.job_id,
            scheduled_at=_iso(event.scheduled_run_time),
            error_class=type(error).__name__,
            error=redact(str(error)),
        )


def make_scheduler(
    *,
    max_workers: int = DEFAULT_MAX_WORKERS,
    misfire_grace_time: float = DEFAULT_MISFIRE_GRACE_TIME,
) -> BackgroundScheduler:
    """Return a stopped background scheduler with explicit job defaults.

    Jobs run on a pool of at most ``max_workers`` threads named
    ``dynaconn-job_N``.  APScheduler 3 counts ``misfire_grace_time`` in
    whole seconds, so a fraction is rounded up (at least one second).
    Stop it with ``shutdown(wait=False)``: a worker stuck on a dead host
    cannot be killed, so jobs bound themselves with timeouts instead.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, not {max_workers}")
    if misfire_grace_time <= 0:
        raise ValueError(
            f"misfire_grace_time must be positive, not {misfire_grace_time}"
        )

    executor = ThreadPoolExecutor(
        max_workers, pool_kwargs={"thread_name_prefix": WORKER_THREAD_PREFIX}
    )
    scheduler = _Scheduler(
        executors={"default": executor},
        job_defaults={
            "coalesce": True,
            "max_instances": 1,
            "misfire_grace_time": max(1, math.ceil(misfire_grace_time)),
        },
        timezone=datetime.UTC,
        daemon=True,
    )
    scheduler.add_listener(
        _on_event, EVENT_JOB_MISSED | EVENT_JOB_ERROR | EVENT_JOB_MAX_INSTANCES
    )
    return scheduler


def add_database_job(
    scheduler: BackgroundScheduler,
    func: Callable[..., None],
    *,
    job_id: str,
    name: str,
    interval: float,
    executor: str,
    args: tuple[Any, ...],
) -> None:
    """Add a job that runs ``func`` now, then every ``interval`` seconds.

    The monitors pause the job while it runs and set its next run
    themselves (see :func:`arm_job`); the interval only matters for a
    run that was missed.
    """
    scheduler.add_job(
        func,
        trigger=IntervalTrigger(seconds=interval, timezone=datetime.UTC),
        args=args,
        id=job_id,
        name=name,
        executor=executor,
        next_run_time=datetime.datetime.now(datetime.UTC),
    )


def remove_job(scheduler: BackgroundScheduler, job_id: str) -> None:
    """Remove a job; one never added, or gone already, is fine."""
    with contextlib.suppress(JobLookupError):
        scheduler.remove_job(job_id)


def arm_job(
    scheduler: BackgroundScheduler, job_id: str, delay: float | None
) -> None:
    """Set a job's next run ``delay`` seconds from now; None pauses it."""
    next_run = None
    if delay is not None:
        next_run = datetime.datetime.now(datetime.UTC) + datetime.timedelta(
            seconds=delay
        )
    # The job may have been removed by sync() or close() while it ran.
    with contextlib.suppress(JobLookupError):
        scheduler.modify_job(job_id, next_run_time=next_run)
