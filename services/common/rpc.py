"""RPC into the cluster from processes that are not nameko services.

The portal, the local launcher, the CLI and the tests call services through a
:class:`RpcPool`: a nameko standalone client is single-threaded, so the pool
hands each thread a client of its own for the length of a call.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import nameko.rpc
from amqp.exceptions import ConnectionError as AmqpConnectionError
from kombu.exceptions import OperationalError
from nameko.amqp.publish import Publisher
from nameko.constants import NON_PERSISTENT
from nameko.exceptions import RpcTimeout
from nameko.standalone.rpc import ClusterRpcClient, ReplyListener

import services.common.remote_errors  # noqa: F401 - errors cross RPC as themselves
from services.common.principals import username_of

# RPC requests and replies are published transient. nameko makes them
# persistent, and a confirmed persistent message to a durable queue waits for
# RabbitMQ to write it to disk: 1–10 ms per publish here, twice per call, for
# a message no one could use after a broker restart (its caller has timed out
# or gone). Transient, a confirm takes ~0.15 ms. Confirms and `mandatory` stay:
# a call to a service that is not there still fails at once.
TRANSIENT = {"delivery_mode": NON_PERSISTENT}


class TransientPublisher(Publisher):
    delivery_mode = NON_PERSISTENT


def transient_replies() -> None:
    """Make this process's RPC entrypoints reply transient (see TRANSIENT).

    nameko has no option for the replies' delivery mode; its Responder takes
    its publisher class from an attribute, set here once per process."""
    nameko.rpc.Responder.publisher_cls = TransientPublisher


def node_local_reply_queues() -> None:
    """Make this process's RPC reply queues transient (non-durable).

    nameko 3.0.0rc11 declares each process's reply queue durable, with an
    expiry. On a cluster a classic durable queue lives on one node; once that
    node is lost the queue cannot be declared again anywhere ("home node …
    is down", 404) until it comes back, so the process could make no more
    RPC calls. A transient queue is deleted with its node, and the reply
    listener declares it anew on the node it reconnects to; the replies it
    held were for calls that have timed out by then anyway. The name has a
    fresh uuid per process, so no broker holds it with the old arguments."""
    listener = nameko.rpc.ReplyListener  # a service's (not the standalone one)
    if getattr(listener.setup, "_node_local", False):
        return
    original = listener.setup

    def setup(self) -> None:
        original(self)
        self.queue.durable = False

    setup._node_local = True  # type: ignore[attr-defined]
    listener.setup = setup  # type: ignore[method-assign]


# A client that failed with one of these has lost its connection: drop it
# rather than hand it to the next caller.
_BROKEN = (OSError, ConnectionError, AmqpConnectionError, OperationalError)


class KeptReplyListener(ReplyListener):
    """A standalone client's reply listener that stays connected.

    nameko's opens a connection to the broker, starts a consumer on the reply
    queue and closes both again *for every reply it waits for* (a new
    ``consume()`` generator per call, dropped after one message): about 8 ms
    of handshakes per call here. This one keeps its generator, and with it one
    connection and one consumer, for the life of the client. A connection the
    broker has closed meanwhile (an idle client missing heartbeats) is opened
    again once per call; the reply waits in the queue, unacked ones requeued.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._replies: Iterator[None] | None = None

    def consume_reply(self, correlation_id: str) -> Any:
        if self.consumer.should_stop:
            raise RuntimeError("Stopped and can no longer be used")
        reconnected = False
        while not self.pending.get(correlation_id):
            if self._replies is None:
                self._replies = self.consumer.consume(timeout=self.timeout)
            try:
                next(self._replies)
            except TimeoutError:
                self._drop()
                raise RpcTimeout() from None
            except _BROKEN:
                self._drop()
                if reconnected:
                    raise
                reconnected = True
        return self.pending.pop(correlation_id)

    def stop(self) -> None:
        super().stop()
        self._drop()

    def _drop(self) -> None:
        replies, self._replies = self._replies, None
        if replies is not None:
            try:
                replies.close()  # leaves the consumer's with-block: disconnects
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass


class Client(ClusterRpcClient):
    """nameko's standalone client with transient calls and a kept reply
    connection (see TRANSIENT and KeptReplyListener). One thread at a time."""

    def __init__(self, amqp_uri: str, timeout: float, ssl: dict | None = None) -> None:
        # ssl None: nameko's AMQP_SSL, as before. user_id: the broker
        # validates it, the service authorises by it (rpc_access.py).
        tls = {} if ssl is None else {"ssl": ssl}
        super().__init__(
            timeout=timeout,
            uri=amqp_uri,
            user_id=username_of(amqp_uri),
            **tls,
            **TRANSIENT,
        )
        plain = self.reply_listener
        self.reply_listener = KeptReplyListener(
            plain.queue, timeout=timeout, uri=plain.amqp_uri, ssl=plain.ssl
        )
        # The proxy was given the replaced listener's registration.
        self.client.register_for_reply = self.reply_listener.register_for_reply


class RpcPool:
    """Up to ``size`` clients of ``amqp_uri``; ``ssl`` is kombu's (see
    ``services/common/broker_tls.py``)."""

    def __init__(
        self,
        amqp_uri: str,
        size: int = 4,
        timeout: float = 10.0,
        ssl: dict | None = None,
    ):
        self.amqp_uri = amqp_uri
        self.ssl = ssl
        self.size = size
        self.timeout = timeout
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._created = 0
        self._lock = threading.Lock()

    def _new(self):
        client = Client(self.amqp_uri, self.timeout, self.ssl)
        return client, client.start()

    @contextmanager
    def proxy(self) -> Iterator[Any]:
        """``with pool.proxy() as rpc: rpc.city_registry.list_cities()``"""
        try:
            entry = self._idle.get_nowait()
        except queue.Empty:
            with self._lock:
                grow = self._created < self.size
                if grow:
                    self._created += 1
            if grow:
                try:
                    entry = self._new()
                except Exception:
                    with self._lock:
                        self._created -= 1
                    raise
            else:
                entry = self._idle.get(timeout=self.timeout)
        broken = False
        try:
            yield entry[1]
        except _BROKEN:
            broken = True
            raise
        finally:
            if broken:
                self._discard(entry)
            else:
                self._idle.put(entry)

    def call(self, service: str, method: str, *args: Any, **kwargs: Any) -> Any:
        with self.proxy() as rpc:
            return getattr(getattr(rpc, service), method)(*args, **kwargs)

    def _discard(self, entry) -> None:
        with self._lock:
            self._created -= 1
        try:
            entry[0].stop()
        except Exception:  # noqa: BLE001 - a broken client is dropped either way
            pass

    def close(self) -> None:
        while True:
            try:
                entry = self._idle.get_nowait()
            except queue.Empty:
                return
            try:
                entry[0].stop()
            except Exception:  # noqa: BLE001
                pass
