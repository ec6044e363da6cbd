"""No broker or database password reaches a log line (issue 16: nameko
masked only the first URI of a failover list)."""

import io
import logging

from services.common.log_redaction import (
    MASK,
    RedactingFormatter,
    redact,
    redact_handlers,
)

FAILOVER = (
    "amqp://dc.guian:s3cret-1@127.0.0.1:5672/;"
    "amqp://dc.guian:s3cret-2@127.0.0.1:5673/;"
    "amqps://dc.guian:s3cret-3@node3:5671/computenet"
)


def test_every_uri_of_a_failover_list_is_masked():
    text = f"Error connecting to broker at {FAILOVER} (timed out)"
    masked = redact(text)
    assert "s3cret" not in masked
    assert masked.count(f"dc.guian:{MASK}@") == 3
    assert masked.endswith("node3:5671/computenet (timed out)")


def test_other_text_is_left_as_it_was():
    for text in (
        "postgresql+psycopg://postgres@127.0.0.1/metering",  # no password
        "http://localhost:15672/api/queues",
        "record r-1 at 2026-12-07T10:00:00Z: 3600 GPU-seconds",
        "amqp://guest:guest@",  # odd but masked
    ):
        expected = text.replace("guest:guest@", f"guest:{MASK}@")
        assert redact(text) == expected


def test_a_handler_masks_messages_and_tracebacks_keeping_its_format():
    stream = io.StringIO()
    logger = logging.getLogger("test_log_redaction")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("X %(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        redact_handlers(logger)
        redact_handlers(logger)  # once is enough; twice wraps nothing more
        assert isinstance(handler.formatter, RedactingFormatter)
        assert not isinstance(handler.formatter.inner, RedactingFormatter)
        logger.warning("connecting to %s", FAILOVER)
        try:
            raise ConnectionError(f"lost {FAILOVER}")
        except ConnectionError:
            logger.exception("relay")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert out.startswith("X WARNING connecting to amqp://dc.guian:")
    assert "s3cret" not in out
    assert "ConnectionError: lost amqp://dc.guian:" in out
