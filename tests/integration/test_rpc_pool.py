"""The portal and the launcher call services from many threads through one
RpcPool; a single standalone client would interleave replies."""

import threading

import pytest
from nameko.rpc import rpc

from services.common.errors import NotFound
from services.common.rpc import RpcPool

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
