"""metering's batch consumer: which acking policy, and its defaults.

The consumer and the confirmed publisher are ``services.common.batching``'s
(frames read and written by hand, one write a batch). metering's worker
returns the indices of the messages to requeue; its batches wait on the
database and the broker's confirms, so one process runs several consumers.
"""

from services.common.batching import RequeueingBatchConsumer


class UsageBatchConsumer(RequeueingBatchConsumer):
    """``@consume_batch(queue)``: the method receives ``list[RawMessage]`` and
    returns the indices of the messages to requeue (or None)."""

    default_batch_size = 200
    default_batch_wait_ms = 50
    default_consumers = 4
    prefetch_batches = 2


consume_batch = UsageBatchConsumer.decorator
