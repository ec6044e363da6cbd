"""Passwords out of logs.

nameko masks the password of the first URI only when it logs a broker error
(``Error connecting to broker at amqp://u:********@h1…; amqp://u:secret@h2…``),
and kombu, SQLAlchemy or a traceback may print any URI in full. Every
process's log handlers format through :class:`RedactingFormatter`, which
masks the password of every ``scheme://user:password@`` in the whole line,
traceback included.
"""

from __future__ import annotations

import logging
import re

MASK = "********"
# scheme://user:password@ — the password ends at the last "@" before the host
# (a password may itself hold "@" only percent-encoded, as URIs require).
_CREDENTIALS = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@;\s]*:)[^@;\s]+@")


def redact(text: str) -> str:
    """``text`` with the password of every URI in it masked."""
    return _CREDENTIALS.sub(lambda m: f"{m.group('head')}{MASK}@", text)


class RedactingFormatter(logging.Formatter):
    """A formatter whose output never holds a URI's password."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


def redact_handlers(logger: logging.Logger | None = None) -> None:
    """Make every handler of ``logger`` (the root logger by default) redact,
    keeping its format. Called once its handlers are configured."""
    for handler in (logger or logging.getLogger()).handlers:
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter))
