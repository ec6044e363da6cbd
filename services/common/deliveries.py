"""Deliveries read from their AMQP frames by hand, on a connection that reads
the socket ahead (:data:`READ_CHUNK`): no py-amqp or kombu ``Message`` per
delivery. Used by the batch consumer (``services/common/batching.py``).
"""

from __future__ import annotations

import errno
import logging
import struct
import types
from collections.abc import Callable
from typing import Any

import amqp
import amqp.exceptions
import amqp.serialization
import amqp.spec
import amqp.transport
from kombu import Connection

from services.common.amqp import RawMessage

log = logging.getLogger(__name__)

# -- deliveries, read by hand ---------------------------------------------------


class Delivery:
    """One delivery to the batch consumer: its tag and the message."""

    __slots__ = ("delivery_tag", "message")

    def __init__(self, delivery_tag: int, message: RawMessage):
        self.delivery_tag = delivery_tag
        self.message = message


def basic_nack(
    channel: amqp.Channel, delivery_tag: int, multiple: bool, requeue: bool
) -> None:
    """``basic.nack`` (RabbitMQ's extension): py-amqp's channel has only
    ``basic_reject``, one delivery at a time; calling a ``basic_nack`` it
    does not have raised AttributeError, and the consumer dropped its
    connection to have its batch requeued that way."""
    channel.send_method(amqp.spec.Basic.Nack, "Lbb", (delivery_tag, multiple, requeue))


def as_delivery(message) -> Delivery:
    """A py-amqp delivery as a :class:`Delivery` (no kombu ``Message`` between)."""
    body = message.body
    if type(body) is not bytes:  # pragma: no cover - py-amqp hands out bytes
        body = body.encode() if isinstance(body, str) else bytes(body)
    properties = message.properties
    delivery = message.delivery_info
    return Delivery(
        delivery["delivery_tag"],
        RawMessage(
            body=body,
            headers=properties.get("application_headers") or {},
            properties=properties,
            routing_key=delivery["routing_key"],
            redelivered=bool(delivery["redelivered"]),
        ),
    )


# basic.deliver, read by hand: py-amqp makes a Message per delivery, decodes
# its arguments through the generic method loader and dispatches it through
# its channel's callbacks (most of the consumer's own time, by the profile).
# Here a delivery's three frames go straight to a RawMessage, with the
# properties py-amqp would have decoded (decode_properties). Every other
# frame goes to py-amqp.
_DELIVER = struct.pack(">HH", *amqp.spec.Basic.Deliver)

# What a usage message carries: content type and encoding, headers, delivery
# mode, priority, message id, user id (AMQP's property flag bits).
_SIMPLE_PROPERTIES = 0x8000 | 0x4000 | 0x2000 | 0x1000 | 0x0800 | 0x0080 | 0x0010
_LONG_STRING = ord("S")


class _NotSimple(Exception):
    pass


def decode_properties(buf: bytes, offset: int) -> dict[str, Any]:
    """``amqp.serialization.decode_properties_basic(buf, offset)[0]``.

    py-amqp's decoder reads a headers table item by item through its generic
    reader (half the cost of reading a delivery); a usage message has only
    the properties above and string headers, read here directly. Anything
    else (another property, a header of another type, text that is not
    UTF-8) is left to py-amqp, which decides it as ever.
    ``test_a_hand_read_delivery_is_what_py_amqp_delivers`` compares them.
    """
    (flags,) = struct.unpack_from(">H", buf, offset)
    if not flags & ~_SIMPLE_PROPERTIES & 0xFFFF:
        try:
            return _simple_properties(buf, offset + 2, flags)
        except (_NotSimple, UnicodeDecodeError, IndexError, struct.error):
            pass
    return amqp.serialization.decode_properties_basic(buf, offset)[0]


def _short_string(buf: bytes, offset: int) -> tuple[str, int]:
    end = offset + 1 + buf[offset]
    if end > len(buf):
        raise _NotSimple
    return buf[offset + 1 : end].decode("utf-8", "surrogatepass"), end


def _simple_properties(buf: bytes, offset: int, flags: int) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    if flags & 0x8000:
        properties["content_type"], offset = _short_string(buf, offset)
    if flags & 0x4000:
        properties["content_encoding"], offset = _short_string(buf, offset)
    if flags & 0x2000:
        (size,) = struct.unpack_from(">I", buf, offset)
        offset += 4
        limit = offset + size
        headers = {}
        while offset < limit:
            key, offset = _short_string(buf, offset)
            if buf[offset] != _LONG_STRING:
                raise _NotSimple
            (length,) = struct.unpack_from(">I", buf, offset + 1)
            end = offset + 5 + length
            if end > limit:
                raise _NotSimple
            headers[key] = buf[offset + 5 : end].decode("utf-8", "surrogatepass")
            offset = end
        properties["application_headers"] = headers
    if flags & 0x1000:
        properties["delivery_mode"] = buf[offset]
        offset += 1
    if flags & 0x0800:
        properties["priority"] = buf[offset]
        offset += 1
    if flags & 0x0080:
        properties["message_id"], offset = _short_string(buf, offset)
    # timestamp (0x0040) and type (0x0020) come between: not simple
    if flags & 0x0010:
        properties["user_id"], offset = _short_string(buf, offset)
    return properties


def read_deliveries(
    connection: Connection, channel_id: int, on_delivery: Callable[[Delivery], Any]
) -> None:
    """Hand channel ``channel_id``'s deliveries to ``on_delivery`` (as
    :class:`Delivery`) before py-amqp sees them; call before consuming."""
    raw = connection.connection
    fallback = raw.on_inbound_frame
    partial: list = []  # [delivery tag, redelivered, routing key, properties, size]
    chunks: list[bytes] = []

    def deliver() -> None:
        tag, redelivered, routing_key, properties, _size = partial
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        partial.clear()
        chunks.clear()
        on_delivery(
            Delivery(
                tag,
                RawMessage(
                    body=bytes(body),
                    headers=properties.get("application_headers") or {},
                    properties=properties,
                    routing_key=routing_key,
                    redelivered=redelivered,
                ),
            )
        )

    def on_frame(frame) -> Any:
        frame_type, channel, buf = frame
        if channel != channel_id:
            return fallback(frame)
        if partial:
            raw.bytes_recv += 1
            if frame_type == 2 and len(partial) == 3:  # the content header
                (size,) = struct.unpack_from(">Q", buf, 4)
                properties = decode_properties(buf, 12)
                partial.extend((properties, size))
                if not size:
                    deliver()
                return True
            if frame_type == 3 and len(partial) == 5:  # (part of) the body
                chunks.append(buf)
                if sum(map(len, chunks)) >= partial[4]:
                    deliver()
                return True
            if frame_type == 8:
                return False
            raise amqp.exceptions.UnexpectedFrame(
                f"Received frame {frame_type} in the middle of a delivery"
            )
        if frame_type == 1 and buf[:4] == _DELIVER:
            raw.bytes_recv += 1
            # consumer tag, delivery tag, redelivered, exchange, routing key
            offset = 5 + buf[4]
            tag, redelivered = struct.unpack_from(">QB", buf, offset)
            offset += 9
            offset += 1 + buf[offset]
            routing_key = buf[offset + 1 : offset + 1 + buf[offset]]
            partial.extend(
                (
                    tag,
                    bool(redelivered & 1),
                    routing_key.decode("utf-8", "surrogatepass"),
                )
            )
            return False
        return fallback(frame)

    raw.on_inbound_frame = on_frame


# -- reading the socket ahead ---------------------------------------------------

# py-amqp reads each frame with two ``recv`` calls of exactly the bytes it
# needs (7 for the header, then the payload): six system calls, each through
# eventlet's green socket, per delivery. Reading up to this much at once and
# keeping the rest in py-amqp's own read buffer serves most frames from memory.
READ_CHUNK = 16 * 1024


def _buffered_read(self, n, initial=False, _errnos=(errno.EAGAIN, errno.EINTR)):
    """``TCPTransport._read``, reading ahead ``READ_CHUNK`` bytes at a time."""
    rbuf = self._read_buffer
    if len(rbuf) >= n:
        self._read_buffer = rbuf[n:]
        return rbuf[:n]
    recv = self._quick_recv
    try:
        while len(rbuf) < n:
            try:
                s = recv(max(n - len(rbuf), READ_CHUNK))
            except OSError as exc:
                if exc.errno in _errnos:
                    if initial and self.raise_on_initial_eintr:
                        raise TimeoutError() from exc
                    continue
                raise
            if not s:
                raise OSError("Server unexpectedly closed connection")
            rbuf += s
    except:  # noqa: E722 - as py-amqp: keep what was read, whatever happened
        self._read_buffer = rbuf
        raise
    result, self._read_buffer = rbuf[:n], rbuf[n:]
    return result


_FRAME_END = 206


def _buffered_frame(transport) -> tuple[int, int, bytes] | None:
    """The next frame if it is whole in the read buffer (else None), taken out
    with one slice rather than py-amqp's three reads."""
    buf = transport._read_buffer
    if len(buf) < 8:
        return None
    frame_type, channel, size = struct.unpack_from(">BHI", buf)
    end = 7 + size
    if len(buf) <= end:
        return None
    if buf[end] != _FRAME_END:
        raise amqp.exceptions.UnexpectedFrame(
            f"Received frame_end {buf[end]:#04x} while expecting 0xce"
        )
    transport._read_buffer = buf[end + 1 :]
    return frame_type, channel, buf[7:end]


def buffer_reads(connection: Connection) -> bool:
    """Make a connected kombu/py-amqp connection read ahead (see READ_CHUNK);
    False if it cannot (TLS)."""
    transport = connection.connection.transport
    if not isinstance(transport, amqp.transport.TCPTransport):
        return False
    transport._read = types.MethodType(_buffered_read, transport)
    return True


def drain_buffered(connection: Connection, limit: int) -> int:
    """Handle up to ``limit`` frames already in the read buffer, without
    touching the socket (nor its timeout); returns how many."""
    raw = connection.connection
    transport = raw.transport
    handled = 0
    while handled < limit:
        frame = _buffered_frame(transport)
        if frame is None:
            break
        raw.on_inbound_frame(frame)
        handled += 1
    return handled
