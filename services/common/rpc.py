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
from nameko.standalone.rpc import ClusterRpcClient

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


# A client that failed with one of these has lost its connection: drop it
# rather than hand it to the next caller.
_BROKEN = (OSError, ConnectionError, AmqpConnectionError, OperationalError)


class RpcPool:
    def __init__(self, amqp_uri: str, size: int = 4, timeout: float = 10.0):
        self.amqp_uri = amqp_uri
        self.size = size
        self.timeout = timeout
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._created = 0
        self._lock = threading.Lock()

    def _new(self):
        client = ClusterRpcClient(timeout=self.timeout, uri=self.amqp_uri, **TRANSIENT)
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
