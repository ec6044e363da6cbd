"""The batch consumers' two acking policies, and the publisher's confirm count."""

import amqp
import amqp.spec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common import batching, deliveries, publishing
from services.common.amqp import RawMessage


class _Channel:
    """Records what a policy sends to the broker, in order. It has what
    py-amqp's channel has, and no more: no ``basic_nack`` (a nack is sent as
    its method frame, ``deliveries.basic_nack``)."""

    def __init__(self, log: list):
        self.log = log

    def basic_ack(self, tag, multiple=False):
        self.log.append(("ack", tag, multiple))

    def send_method(self, sig, format=None, args=None):
        assert sig == amqp.spec.Basic.Nack and format == "Lbb", sig
        tag, multiple, requeue = args
        self.log.append(("nack", tag, multiple, requeue))

    def basic_reject(self, tag, requeue=True):
        self.log.append(("reject", tag, requeue))


class _Confirmation:
    def __init__(self, log: list, name: str, fails: bool = False):
        self.log, self.name, self.fails = log, name, fails

    def wait(self):
        self.log.append(("wait", self.name))
        if self.fails:
            raise ConnectionError("nacked")


def _batch(first: int, size: int) -> list[deliveries.Delivery]:
    message = RawMessage(b"{}", {}, {}, "dc.usage", False)
    return [deliveries.Delivery(tag, message) for tag in range(first, first + size)]


@pytest.fixture(autouse=True)
def no_pause(monkeypatch):
    monkeypatch.setattr(batching, "RETRY_PAUSE_S", 0)


def _failed():
    try:
        raise RuntimeError("the database went away")
    except RuntimeError as exc:
        return (type(exc), exc, exc.__traceback__)


def test_requeueing_acks_a_batch_with_one_ack():
    log = []
    acks = batching._RequeueIndices(_Channel(log))
    acks.done(_batch(1, 3), [], None)
    acks.done(_batch(4, 2), None, None)
    assert log == [("ack", 3, True), ("ack", 5, True)]


def test_requeueing_requeues_the_indices_the_worker_names_and_acks_the_rest():
    log = []
    acks = batching._RequeueIndices(_Channel(log))
    acks.done(_batch(10, 4), [1, 3], None)
    assert log == [
        ("ack", 10, False),
        ("reject", 11, True),
        ("ack", 12, False),
        ("reject", 13, True),
    ]


def test_requeueing_requeues_the_whole_batch_of_a_worker_that_raised():
    log = []
    acks = batching._RequeueIndices(_Channel(log))
    acks.done(_batch(1, 3), None, _failed())
    assert log == [("nack", 3, True, True)]


def test_a_confirmed_batch_is_acked_only_once_its_confirmation_completed():
    log = []
    acks = batching._AckWhenConfirmed(_Channel(log))
    acks.done(_batch(1, 3), _Confirmation(log, "first"), None)
    assert log == []  # handed back at once: the next batch is worked on
    acks.done(_batch(4, 2), _Confirmation(log, "second"), None)
    # the first batch is settled before the second is held: acks in order
    assert log == [("wait", "first"), ("ack", 3, True)]
    acks.idle()
    assert log[2:] == [("wait", "second"), ("ack", 5, True)]
    acks.idle()
    acks.close()
    assert len(log) == 4  # nothing was awaiting confirmation any more


def test_a_batch_whose_events_were_not_confirmed_is_requeued_alone():
    log = []
    acks = batching._AckWhenConfirmed(_Channel(log))
    acks.done(_batch(1, 3), _Confirmation(log, "first", fails=True), None)
    acks.done(_batch(4, 2), _Confirmation(log, "second"), None)
    acks.close()
    assert log == [
        ("wait", "first"),
        ("nack", 3, True, True),
        ("wait", "second"),
        ("ack", 5, True),
    ]


def test_a_failed_or_unconfirmed_worker_is_settled_after_the_batch_before_it():
    log = []
    acks = batching._AckWhenConfirmed(_Channel(log))
    acks.done(_batch(1, 2), _Confirmation(log, "first"), None)
    acks.done(_batch(3, 2), None, _failed())
    acks.done(_batch(5, 2), None, None)  # nothing published: acked at once
    assert log == [
        ("wait", "first"),
        ("ack", 2, True),
        ("nack", 4, True, True),
        ("ack", 6, True),
    ]


def test_a_partly_done_batch_acks_its_done_messages_once_confirmed():
    """A worker that booked its batch one by one (issue 16) names the
    messages to try again: they are requeued, the others acked, each on its
    own and only once the done ones' events are confirmed; the next batch's
    ``multiple`` ack then covers nothing of it."""
    log = []
    acks = batching._AckWhenConfirmed(_Channel(log))
    done = batching.Requeue(frozenset({1}), _Confirmation(log, "first"))
    acks.done(_batch(1, 3), done, None)
    assert log == []  # like a confirmation: the next batch is worked on
    acks.done(_batch(4, 2), _Confirmation(log, "second"), None)
    acks.close()
    assert log == [
        ("wait", "first"),
        ("ack", 1, False),
        ("reject", 2, True),
        ("ack", 3, False),
        ("wait", "second"),
        ("ack", 5, True),
    ]


def test_a_partly_done_batch_without_events_or_confirmed_is_settled_so():
    log = []
    acks = batching._AckWhenConfirmed(_Channel(log))
    acks.done(_batch(1, 2), batching.Requeue(frozenset({0})), None)
    acks.done(
        _batch(3, 2),
        batching.Requeue(frozenset({1}), _Confirmation(log, "x", fails=True)),
        None,
    )
    acks.close()
    assert log == [
        ("reject", 1, True),
        ("ack", 2, False),
        ("wait", "x"),
        ("nack", 4, True, True),  # unconfirmed: all of it again
    ]


def test_each_policy_keeps_its_service_defaults():
    from services.metering.batching import UsageBatchConsumer
    from services.vouchers.batching import UsageRatedConsumer

    assert issubclass(UsageBatchConsumer, batching.RequeueingBatchConsumer)
    assert issubclass(UsageRatedConsumer, batching.ConfirmedBatchConsumer)
    assert not UsageBatchConsumer.receive_while_working
    assert UsageRatedConsumer.receive_while_working
    defaults = (
        "default_batch_size",
        "default_batch_wait_ms",
        "default_consumers",
        "prefetch_batches",
    )
    assert [getattr(UsageBatchConsumer, name) for name in defaults] == [200, 50, 4, 2]
    assert [getattr(UsageRatedConsumer, name) for name in defaults] == [200, 20, 1, 3]


def _counting_channel() -> publishing.ConfirmingChannel:
    """A ConfirmingChannel's confirm count, without a broker."""
    channel = object.__new__(publishing.ConfirmingChannel)
    channel.published, channel.confirmed, channel.acked = 0, 0, set()
    channel.nacked = False
    return channel


@settings(max_examples=300, deadline=None)
@given(st.data(), st.integers(1, 60))
def test_the_watermark_counts_confirms_however_the_broker_groups_them(data, count):
    """Acks in any order, single or covering every tag up to theirs: the
    watermark is the last tag up to which every event is confirmed."""
    order = data.draw(st.permutations(range(1, count + 1)))
    channel = _counting_channel()
    confirmed: set[int] = set()
    for tag in order:
        if tag in confirmed:
            continue
        multiple = data.draw(st.booleans())
        channel._on_ack(tag, multiple)
        confirmed |= set(range(1, tag + 1)) if multiple else {tag}
        watermark = 0
        while watermark + 1 in confirmed:
            watermark += 1
        assert channel.confirmed == watermark
        assert channel.acked == {t for t in confirmed if t > watermark}
    assert channel.confirmed == count and not channel.acked


def test_a_multiple_ack_moves_the_watermark_without_a_sweep():
    channel = _counting_channel()
    for tag in range(1, 10_001):
        channel._on_ack(tag, True)
    assert channel.confirmed == 10_000 and channel.acked == set()
    channel._on_ack(9_000, False)  # stale: already counted
    assert channel.confirmed == 10_000 and channel.acked == set()


def test_a_nack_fails_the_channel():
    channel = _counting_channel()
    channel._on_nack(1, False)
    assert channel.nacked
