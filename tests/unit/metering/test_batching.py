"""The consumer's read-ahead of py-amqp frames: the same frames, fewer reads."""

import struct
import types

import amqp.serialization
import amqp.spec
import amqp.transport
import pytest
from amqp.method_framing import frame_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from services.metering import batching


def frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + b"\xce"


def transport_reading(chunks: list[bytes]):
    """A py-amqp TCP transport (never connected) whose socket yields ``chunks``,
    read ahead the way the batch consumer does."""
    transport = amqp.transport.TCPTransport("localhost:5672")
    transport._read_buffer = b""
    pending = list(chunks)
    asked = []

    def recv(n):
        asked.append(n)
        if not pending:
            raise TimeoutError("nothing more")
        chunk = pending.pop(0)
        if len(chunk) > n:
            pending.insert(0, chunk[n:])
            chunk = chunk[:n]
        return chunk

    transport._quick_recv = recv
    transport._read = types.MethodType(batching._buffered_read, transport)
    return transport, asked


frames_strategy = st.lists(
    st.tuples(
        st.sampled_from([1, 2, 3, 8]), st.integers(0, 3), st.binary(max_size=300)
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(frames_strategy, st.lists(st.integers(1, 500), min_size=1, max_size=60))
def test_read_ahead_yields_the_same_frames_however_the_bytes_arrive(frames, cuts):
    stream = b"".join(frame(*f) for f in frames)
    chunks, position = [], 0
    for cut in cuts:
        if position >= len(stream):
            break
        chunks.append(stream[position : position + cut])
        position += cut
    if position < len(stream):
        chunks.append(stream[position:])
    transport, _asked = transport_reading(chunks)
    got = []
    while len(got) < len(frames):
        buffered = batching._buffered_frame(transport)
        if buffered is None:
            buffered = transport.read_frame()
        got.append(tuple(buffered))
    assert got == [tuple(f) for f in frames]
    assert transport._read_buffer == b""


def test_many_small_frames_take_one_read():
    frames = [(3, 1, b"x" * 200) for _ in range(50)]
    transport, asked = transport_reading([b"".join(frame(*f) for f in frames)])
    got = [transport.read_frame()]
    while (buffered := batching._buffered_frame(transport)) is not None:
        got.append(buffered)
    assert got == frames
    assert len(asked) == 1 and asked[0] >= batching.READ_CHUNK


def test_a_timeout_keeps_what_was_read():
    whole = frame(3, 1, b"y" * 100)
    transport, _asked = transport_reading([whole[:50]])
    with pytest.raises(TimeoutError):
        transport.read_frame()
    transport._quick_recv = lambda n: whole[50:]
    assert transport.read_frame() == (3, 1, b"y" * 100)


def test_a_broken_frame_end_is_refused():
    transport, _asked = transport_reading([])
    transport._read_buffer = frame(3, 1, b"z")[:-1] + b"\x00"
    with pytest.raises(amqp.exceptions.UnexpectedFrame):
        batching._buffered_frame(transport)


class _Stub:
    frame_max = 131072
    bytes_sent = 0


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 65535),
    st.sampled_from(["computenet.federation", ""]),
    st.text(min_size=1, max_size=60),
    st.text(min_size=1, max_size=60),  # at most 240 bytes: a short string
    st.binary(min_size=1, max_size=3000),
)
def test_hand_framed_publish_is_what_py_amqp_writes(
    channel_id, exchange, routing_key, message_id, body
):
    """The frames of one event are byte for byte py-amqp's basic.publish."""
    frames: list[bytes] = []
    write = frame_writer(_Stub(), batching._Collector(frames))
    message = amqp.Message(
        body=body,
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,
        message_id=message_id,
    )
    args = amqp.serialization.dumps("Bssbb", (0, exchange, routing_key, False, False))
    write(1, channel_id, amqp.spec.Basic.Publish, args, message)
    ours = batching.publish_content_frames(
        channel_id, message_id, body, _Stub.frame_max
    )
    assert ours is not None
    mine = batching.publish_method_frame(channel_id, exchange, routing_key) + ours
    assert mine == b"".join(frames)


def test_an_event_too_big_for_one_frame_is_left_to_py_amqp():
    assert batching.publish_content_frames(1, "id", b"x" * 5000, 4096) is None
    assert batching.publish_content_frames(1, "i" * 256, b"{}", 131072) is None
