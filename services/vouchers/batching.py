"""The ``usage_rated`` batch consumer: which acking policy, and its defaults.

The consumer and the confirmed publisher are ``services.common.batching``'s.
A worker returns the :class:`~services.common.batching.Confirmation` of its
``voucher_redeemed`` events: the consumer books the next batch while the
broker confirms them, and acks in delivery order once they are confirmed.

One consumer (``CONSUMERS``) books the queue in its order (a correction after
the record it corrects reverses it); with more, RabbitMQ deals the messages
out in turn, so a correction may be booked first and its original refused as
``superseded`` (consistent books either way, as with copies of the service),
in exchange for overlapping one batch's database work with another's. Each
batch locks its vouchers, so batches (and copies of the service) serialise on
the vouchers they share and overlap on the rest.
"""

from services.common.batching import ConfirmedBatchConsumer


class UsageRatedConsumer(ConfirmedBatchConsumer):
    """``@consume_batch(queue)``: the method receives ``list[RawMessage]`` and
    may return a ``Confirmation`` of its events."""

    default_batch_size = 200
    default_batch_wait_ms = 20
    default_consumers = 1


consume_batch = UsageRatedConsumer.decorator
