"""A tenant's voucher hand-over is a binding request (CONTRACTS.md §6): stored in
the outbox in the hand-over's own transaction, published signed on
``<dc>.binding`` by the relay (here on a recorded channel, no broker)."""

import json

import pytest
from marshmallow import ValidationError

from services.common import signing
from services.common.contracts import BindingRequestSchema
from services.common.units import parse_ts
from services.common.vouchercode import generate
from services.datacenter_gateway import domain
from services.datacenter_gateway import outbox as outbox_module
from services.datacenter_gateway.relay import Relay

DC = "guian-gov-01"


def requests_of(outbox) -> list[dict]:
    """The unpublished binding requests, oldest first, as their bodies say."""
    rows = outbox.pending_bindings(100)
    bodies = [json.loads(row.body) for row in rows]
    assert [row.record_id for row in rows] == [b["request_id"] for b in bodies]
    return bodies


def test_a_hand_over_asks_the_holder(client, outbox, voucher_code):
    response = client.put(
        "/v1/tenants/acme/voucher", json={"voucher_code": voucher_code.lower()}
    )
    assert response.status_code == 200
    answer = response.get_json()
    assert answer["status"] == "requested"
    assert answer["voucher_code"] == voucher_code
    [body] = requests_of(outbox)
    # The contract's fields exactly, and it loads through the contract.
    assert set(body) == {
        "request_id",
        "datacenter_id",
        "tenant_id",
        "voucher_code",
        "action",
        "requested_at",
    }
    assert BindingRequestSchema().load(body)
    assert body == {
        "request_id": answer["request_id"],
        "datacenter_id": DC,
        "tenant_id": "acme",
        "voucher_code": voucher_code,
        "action": "request",
        "requested_at": answer["requested_at"],
    }
    assert outbox.get_voucher("acme") == voucher_code


def test_the_same_hand_over_again_asks_nothing_new(client, outbox, voucher_code):
    first = client.put("/v1/tenants/acme/voucher", json={"voucher_code": voucher_code})
    again = client.put("/v1/tenants/acme/voucher", json={"voucher_code": voucher_code})
    assert again.get_json() == first.get_json()
    assert len(requests_of(outbox)) == 1


def test_another_voucher_cancels_the_first_then_asks(client, outbox, voucher_code):
    other = generate("CD")
    client.put("/v1/tenants/acme/voucher", json={"voucher_code": voucher_code})
    client.put("/v1/tenants/acme/voucher", json={"voucher_code": other})
    asked = [(b["action"], b["voucher_code"]) for b in requests_of(outbox)]
    assert asked == [
        ("request", voucher_code),
        ("cancel", voucher_code),
        ("request", other),
    ]
    assert len({b["request_id"] for b in requests_of(outbox)}) == 3


def test_ending_the_hand_over_cancels_it_once(client, outbox, voucher_code):
    client.put("/v1/tenants/acme/voucher", json={"voucher_code": voucher_code})
    assert client.delete("/v1/tenants/acme/voucher").status_code == 204
    assert client.delete("/v1/tenants/acme/voucher").status_code == 204
    assert [b["action"] for b in requests_of(outbox)] == ["request", "cancel"]
    # Handed over again: asked again, under a new id.
    client.put("/v1/tenants/acme/voucher", json={"voucher_code": voucher_code})
    bodies = requests_of(outbox)
    assert [b["action"] for b in bodies] == ["request", "cancel", "request"]
    assert bodies[0]["request_id"] != bodies[2]["request_id"]


def test_a_refused_hand_over_asks_nothing(client, outbox):
    bad = client.put("/v1/tenants/acme/voucher", json={"voucher_code": "SH-NOPE"})
    assert bad.status_code == 400
    long = client.put("/v1/tenants/" + "t" * 129 + "/voucher", json={})
    assert long.status_code == 400
    assert requests_of(outbox) == []


def test_the_hand_over_and_its_request_are_one_transaction(
    client, outbox, voucher_code, monkeypatch
):
    """A request that cannot be written takes the hand-over with it: a data
    centre never bills a voucher it did not ask for."""

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(outbox_module, "binding_request", broken)
    response = client.put(
        "/v1/tenants/acme/voucher", json={"voucher_code": voucher_code}
    )
    assert response.status_code == 500
    assert outbox.get_voucher("acme") is None
    assert requests_of(outbox) == []


def test_status_counts_unpublished_requests(client, outbox, voucher_code):
    client.put("/v1/tenants/acme/voucher", json={"voucher_code": voucher_code})
    assert client.get("/v1/status").get_json()["binding_backlog"] == 1
    outbox.mark_bindings_published([outbox.pending_bindings(1)[0].id])
    assert client.get("/v1/status").get_json()["binding_backlog"] == 0


def test_request_ids_are_stable_per_tenant_voucher_action_and_time(voucher_code):
    at = parse_ts("2025-03-01T08:00:00Z")
    made = domain.binding_request(DC, "acme", voucher_code, domain.REQUEST, at)
    assert made == domain.binding_request(DC, "acme", voucher_code, "request", at)
    others = {
        domain.binding_request("other-dc", "acme", voucher_code, "request", at),
        domain.binding_request(DC, "beta", voucher_code, "request", at),
        domain.binding_request(DC, "acme", generate("SH"), "request", at),
        domain.binding_request(DC, "acme", voucher_code, "cancel", at),
        domain.binding_request(
            DC, "acme", voucher_code, "request", at.replace(microsecond=1)
        ),
    }
    assert made.request_id not in {o.request_id for o in others}
    assert len({o.request_id for o in others}) == len(others)
    assert len(made.request_id) <= 128


def test_the_contract_refuses_what_it_does_not_know(voucher_code):
    body = json.loads(
        domain.binding_request(
            DC, "acme", voucher_code, "request", parse_ts("2025-03-01T08:00:00Z")
        ).body
    )
    for change in ({"action": "authorise"}, {"extra": 1}, {"voucher_code": "SH-X"}):
        with pytest.raises(ValidationError):
            BindingRequestSchema().load({**body, **change})


# -- the relay, on a recorded channel -------------------------------------------


class RecordedBroker:
    """A channel and connection in confirm mode: every publish is kept and
    acked, and returned first when its routing key is in ``unroutable``."""

    def __init__(self, relay: Relay, unroutable=()):
        self.relay = relay
        self.unroutable = set(unroutable)
        self.published: list[tuple[str, object]] = []
        self._settled = 0
        self.connection = self  # relay._conn.connection.drain_events

    def basic_publish(self, message, exchange, routing_key, mandatory):
        assert mandatory and exchange == "computenet.usage"
        self.published.append((routing_key, message))

    def drain_events(self, timeout=None):
        for tag, (routing_key, message) in enumerate(
            self.published[self._settled :], start=self._settled + 1
        ):
            if routing_key in self.unroutable:
                self.relay._on_return(None, "computenet.usage", routing_key, message)
            self.relay._on_ack(tag, False)
        self._settled = len(self.published)


def relay_on(outbox, unroutable=()) -> tuple[Relay, RecordedBroker]:
    relay = Relay(outbox, "amqp://dc.guian-gov-01:pw@localhost//", DC, "k1", "s3cret")
    broker = RecordedBroker(relay, unroutable)
    relay._conn = relay._channel = broker
    return relay, broker


def test_the_relay_publishes_requests_signed_on_the_binding_key(
    client, outbox, voucher_code, record_factory
):
    client.put("/v1/tenants/acme/voucher", json={"voucher_code": voucher_code})
    client.post("/v1/usage", json=[record_factory()])
    [request] = outbox.pending_bindings(10)
    relay, broker = relay_on(outbox)
    assert relay.publish_pending() == 2
    assert [key for key, _ in broker.published] == [
        f"{DC}.binding",
        f"{DC}.usage",
    ]
    _, message = broker.published[0]
    assert message.body == request.body
    assert message.properties["message_id"] == request.record_id
    assert message.properties["user_id"] == "dc.guian-gov-01"
    assert message.properties["delivery_mode"] == 2
    headers = message.properties["application_headers"]
    assert headers[signing.KEY_ID_HEADER] == "k1"
    assert signing.verify(request.body, "s3cret", headers[signing.SIGNATURE_HEADER])
    assert outbox.pending_bindings(10) == [] and outbox.pending(10) == []
    assert relay.publish_pending() == 0  # nothing published twice


def test_unroutable_requests_wait_without_holding_up_usage(
    client, outbox, voucher_code, record_factory
):
    client.put("/v1/tenants/acme/voucher", json={"voucher_code": voucher_code})
    client.post("/v1/usage", json=[record_factory()])
    relay, broker = relay_on(outbox, unroutable={f"{DC}.binding"})
    assert relay.publish_pending() == 1  # the record; the request stays
    assert len(outbox.pending_bindings(10)) == 1
    assert outbox.pending(10) == []
    assert "binding requests returned unroutable" in relay.status.last_error
    # Backed off: the next pass does not try the request again at once.
    client.post("/v1/usage", json=[record_factory()])
    assert relay.publish_pending() == 1
    assert [key for key, _ in broker.published].count(f"{DC}.binding") == 1
    # Once a queue takes them (and the back-off is over), they go.
    broker.unroutable.clear()
    relay._bindings_due = 0.0
    assert relay.publish_pending() == 1
    assert outbox.pending_bindings(10) == []
