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
