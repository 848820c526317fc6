"""Which session a log line belongs to.

``bind_session(id)`` runs in the task that opens a session (``Session.start``); tasks started
from that task afterwards inherit the id (``contextvars``). ``SessionFilter`` on a handler puts
it on every record as ``%(session)s`` (``-`` outside any session). Log lines name sessions by
id and never carry what was said: transcripts, answers and keys stay out of the logs.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

SESSION: ContextVar[str] = ContextVar("session", default="-")


def bind_session(session_id: str) -> None:
    """Log lines of this task, and of tasks it starts from now on, name ``session_id``."""
    SESSION.set(session_id)


class SessionFilter(logging.Filter):
    """Adds ``record.session``: the session the logging task works for, or ``-``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session"):
            record.session = SESSION.get()
        return True


def install(handlers: list[logging.Handler] | None = None) -> None:
    """Put ``SessionFilter`` on ``handlers`` (default: the root logger's)."""
    for handler in handlers if handlers is not None else logging.getLogger().handlers:
        if not any(isinstance(f, SessionFilter) for f in handler.filters):
            handler.addFilter(SessionFilter())
