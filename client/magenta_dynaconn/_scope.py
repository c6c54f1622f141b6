"""The part of the registry interface both registries share verbatim."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.orm import Session

__all__ = ["SessionScopeMixin"]


class SessionScopeMixin:
    """``session_scope`` on top of the registry's own ``new_session``."""

    def new_session(self, name: str) -> Session:
        """Return a new ORM session on the database called ``name``."""
        raise NotImplementedError

    @contextlib.contextmanager
    def session_scope(self, name: str) -> Iterator[Session]:
        """Yield a session; commit on success, roll back on error, close."""
        session = self.new_session(name)
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
