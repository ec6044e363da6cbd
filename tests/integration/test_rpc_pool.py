"""The portal and the launcher call services from many threads through one
RpcPool; a single standalone client would interleave replies."""

import threading

import pytest
from nameko.rpc import rpc

from services.common.errors import NotFound
from services.common.rpc import RpcPool
from tests.support import management

pytestmark = pytest.mark.integration


class EchoService:
    name = "echo"

    @rpc
    def double(self, value):
        return value * 2

    @rpc
    def missing(self, code):
        raise NotFound("thing_not_found", f"no thing {code}", {"code": code})


def test_pool_serves_concurrent_callers_and_typed_errors(
    rabbit_config, rabbit_uri, container_factory
):
    container = container_factory(EchoService)
    container.start()
    pool = RpcPool(rabbit_uri, size=3, timeout=10)
    results: dict[int, int] = {}

    def call(i):
        results[i] = pool.call("echo", "double", i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == {i: 2 * i for i in range(30)}
    assert pool._created <= 3

    with pytest.raises(NotFound) as info:
        pool.call("echo", "missing", "x1")
    assert info.value.code == "thing_not_found"
    assert info.value.details == {"code": "x1"}
    pool.close()


def test_requests_and_replies_are_transient(
    rabbit_config, rabbit_uri, container_factory
):
    """Neither a call nor its answer waits for RabbitMQ's disk (rpc.py)."""
    from kombu import Connection, Exchange, Queue

    from services.common.rpc import transient_replies

    transient_replies()  # what services.common.runner does in every service
    container = container_factory(EchoService)
    container.start()
    with Connection(rabbit_uri) as conn:
        spy = Queue(
            "rpc-spy",
            Exchange("nameko-rpc", type="topic", durable=True),
            routing_key="#",
            auto_delete=True,
        )
        spy(conn).declare()
        pool = RpcPool(rabbit_uri, size=1, timeout=10)
        assert pool.call("echo", "double", 21) == 42
        pool.close()
        seen = []
        while (message := spy(conn).get(no_ack=True)) is not None:
            seen.append((message.delivery_info["routing_key"], message.properties))
    assert len(seen) == 2, seen  # the call and its reply
    assert seen[0][0] == "echo.double"
    assert [properties["delivery_mode"] for _, properties in seen] == [1, 1]


class SlowService:
    name = "slow"

    @rpc
    def wait(self, seconds):
        import eventlet

        eventlet.sleep(seconds)
        return seconds


def _vhost_connections(rabbit_uri):
    vhost = management.vhost_of(rabbit_uri)
    return [c["name"] for c in management.get("vhosts", vhost, "connections")]


def test_a_client_keeps_one_reply_connection(
    rabbit_config, rabbit_uri, container_factory
):
    """nameko's standalone client connected anew for each reply (rpc.py)."""
    container_factory(EchoService).start()
    pool = RpcPool(rabbit_uri, size=1, timeout=10)
    assert pool.call("echo", "double", 1) == 2
    (entry,) = list(pool._idle.queue)
    replies = entry[0].reply_listener._replies
    assert replies is not None
    for i in range(20):
        assert pool.call("echo", "double", i) == 2 * i
    assert entry[0].reply_listener._replies is replies
    pool.close()


def test_a_client_whose_connections_were_closed_calls_again(
    rabbit_config, rabbit_uri, container_factory
):
    container_factory(EchoService).start()
    pool = RpcPool(rabbit_uri, size=1, timeout=10)
    assert pool.call("echo", "double", 1) == 2
    # The broker drops every connection of the vhost (as it does an idle
    # client's that missed its heartbeats); the service reconnects by itself.
    for name in _vhost_connections(rabbit_uri):
        management.delete("connections", name)
    # The request waits in the service's queue until it is back.
    assert [pool.call("echo", "double", i) for i in range(5)] == [0, 2, 4, 6, 8]
    pool.close()


def test_a_timed_out_call_leaves_the_client_usable(
    rabbit_config, rabbit_uri, container_factory
):
    from nameko.exceptions import RpcTimeout

    container_factory(SlowService).start()
    pool = RpcPool(rabbit_uri, size=1, timeout=0.5)
    with pytest.raises(RpcTimeout):
        pool.call("slow", "wait", 1.5)
    assert pool.call("slow", "wait", 0) == 0  # the late reply is not taken
    pool.close()
