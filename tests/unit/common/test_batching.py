"""The shared batching pieces: read-ahead, hand-read deliveries, hand framing."""

import struct
import types

import amqp.serialization
import amqp.spec
import amqp.transport
import pytest
from amqp.method_framing import frame_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common import deliveries, publishing


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
    transport._read = types.MethodType(deliveries._buffered_read, transport)
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
        buffered = deliveries._buffered_frame(transport)
        if buffered is None:
            buffered = transport.read_frame()
        got.append(tuple(buffered))
    assert got == [tuple(f) for f in frames]
    assert transport._read_buffer == b""


def test_many_small_frames_take_one_read():
    frames = [(3, 1, b"x" * 200) for _ in range(50)]
    transport, asked = transport_reading([b"".join(frame(*f) for f in frames)])
    got = [transport.read_frame()]
    while (buffered := deliveries._buffered_frame(transport)) is not None:
        got.append(buffered)
    assert got == frames
    assert len(asked) == 1 and asked[0] >= deliveries.READ_CHUNK


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
        deliveries._buffered_frame(transport)


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
    write = frame_writer(_Stub(), publishing._Collector(frames))
    message = amqp.Message(
        body=body,
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,
        message_id=message_id,
    )
    args = amqp.serialization.dumps("Bssbb", (0, exchange, routing_key, False, False))
    write(1, channel_id, amqp.spec.Basic.Publish, args, message)
    ours = publishing.publish_content_frames(
        channel_id, message_id, body, _Stub.frame_max
    )
    assert ours is not None
    mine = publishing.publish_method_frame(channel_id, exchange, routing_key) + ours
    assert mine == b"".join(frames)


def test_an_event_too_big_for_one_frame_is_left_to_py_amqp():
    assert publishing.publish_content_frames(1, "id", b"x" * 5000, 4096) is None
    assert publishing.publish_content_frames(1, "i" * 256, b"{}", 131072) is None


def _split_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    frames, offset = [], 0
    while offset < len(data):
        frame_type, channel, size = struct.unpack_from(">BHI", data, offset)
        frames.append((frame_type, channel, data[offset + 7 : offset + 7 + size]))
        offset += 8 + size
    return frames


class _Connection:
    """What ``read_deliveries`` touches of a kombu connection, around a stub
    py-amqp one whose own frame handler is py-amqp's (deliveries it would make
    are collected)."""

    def __init__(self):
        self.connection = types.SimpleNamespace(bytes_recv=0)
        self.by_py_amqp = []
        self.connection.on_inbound_frame = amqp.method_framing.frame_handler(
            self.connection,
            lambda channel, method, args, content: self.by_py_amqp.append(
                (channel, method, args, content)
            ),
        )


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 8),
    st.integers(1, 2**64 - 1),
    st.booleans(),
    st.text(max_size=60),
    st.binary(max_size=9000),
    st.dictionaries(
        st.text(min_size=1, max_size=20),
        # strings are read by hand; anything else (and bytes that are not
        # UTF-8, sent as strings) is left to py-amqp
        st.one_of(
            st.text(max_size=80),
            st.text(max_size=80),
            st.integers(-(2**31), 2**31 - 1),
            st.booleans(),
            st.binary(max_size=20),
        ),
        max_size=4,
    ),
    st.one_of(st.none(), st.text(max_size=40)),
    st.integers(4096, 131072),
    st.dictionaries(
        st.sampled_from(
            ["content_encoding", "priority", "correlation_id", "user_id", "type"]
        ),
        st.sampled_from(["utf-8", "x", "dc.guian-gov-01"]),
    ),
)
def test_a_hand_read_delivery_is_what_py_amqp_delivers(
    channel_id,
    tag,
    redelivered,
    routing_key,
    body,
    headers,
    message_id,
    frame_max,
    more,
):
    stub = _Stub()
    stub.frame_max = frame_max
    frames: list[bytes] = []
    write = frame_writer(stub, publishing._Collector(frames))
    properties = {"content_type": "application/json", "delivery_mode": 2}
    if headers:
        properties["application_headers"] = headers
    if message_id is not None:
        properties["message_id"] = message_id
    for name, value in more.items():  # priority is a number, the others text
        properties[name] = 5 if name == "priority" else value
    args = amqp.serialization.dumps(
        "sLbss", ("ctag", tag, redelivered, "computenet.usage", routing_key)
    )
    write(
        1, channel_id, amqp.spec.Basic.Deliver, args, amqp.Message(body, **properties)
    )
    # frames of another channel and of the connection pass through to py-amqp
    blocked = amqp.serialization.dumps("s", ("x",))
    write(1, 0, amqp.spec.Connection.Blocked, blocked, None)
    stream = _split_frames(b"".join(frames))

    reference = _Connection()
    for item in stream:
        reference.connection.on_inbound_frame(item)
    [(_channel, _method, ref_args, ref_message), blocked] = reference.by_py_amqp
    assert blocked[0] == 0
    ref_args, _offset = amqp.serialization.loads("sLbss", ref_args, 4)

    ours = _Connection()
    got = []
    deliveries.read_deliveries(ours, channel_id, got.append)
    for item in stream:
        ours.connection.on_inbound_frame(item)
    [delivery] = got
    assert len(ours.by_py_amqp) == 1  # connection.blocked, py-amqp's
    assert delivery.delivery_tag == ref_args[1] == tag
    message = delivery.message
    assert message.redelivered is ref_args[2] is redelivered
    assert message.routing_key == ref_args[4] == routing_key
    assert message.body == body
    assert ref_message.body == (body or "")  # py-amqp: "" for no body at all
    assert message.properties == ref_message.properties
    assert message.headers == (ref_message.properties.get("application_headers") or {})
    assert message.message_id == message_id


def test_a_stray_frame_in_a_delivery_is_refused():
    connection = _Connection()
    deliveries.read_deliveries(connection, 1, lambda delivery: None)
    args = amqp.serialization.dumps("sLbss", ("c", 1, False, "x", "dc.usage"))
    connection.connection.on_inbound_frame((1, 1, b"\x00\x3c\x00\x3c" + args))
    with pytest.raises(amqp.exceptions.UnexpectedFrame):
        connection.connection.on_inbound_frame((3, 1, b"body before its header"))
