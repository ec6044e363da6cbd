"""The integrity view's rows: metering's and the cities' counts side by side,
shares over what the data centre sent (rated + set aside by metering)."""

from gateway.integrity import datacenter_rows

EMPTY = {"records": 0, "dead_letters": {}}


def test_shares_count_a_city_refusal_within_the_rated_records():
    metering = {
        "dc-a": {
            "24h": {"records": 90, "dead_letters": {"exceeds_inventory": 10}},
            "7d": {"records": 190, "dead_letters": {"exceeds_inventory": 10}},
        }
    }
    city = {
        "24h": [
            {
                "datacenter_id": "dc-a",
                "kind": "refused",
                "reason": "tenant_not_authorised",
                "count": 5,
            },
            {
                "datacenter_id": "dc-a",
                "kind": "held",
                "reason": "over_capacity",
                "count": 20,
            },
        ],
        "7d": [],
    }

    (row,) = datacenter_rows(metering, city)

    day = row["24h"]
    assert (day["records"], day["refused"], day["held"]) == (100, 15, 20)
    assert (day["refused_share"], day["held_share"]) == (0.15, 0.2)
    assert [(r["source"], r["reason"], r["share"]) for r in day["reasons"]] == [
        ("metering", "exceeds_inventory", 0.1),
        ("city", "tenant_not_authorised", 0.05),
        ("city", "over_capacity", 0.2),
    ]
    assert row["7d"]["refused_share"] == 0.05


def test_a_data_centre_only_a_city_knows_has_no_share():
    city = {
        "24h": [
            {"datacenter_id": "dc-z", "kind": "refused", "reason": "x", "count": 1}
        ],
        "7d": [],
    }

    (row,) = datacenter_rows({}, city)

    assert row["datacenter_id"] == "dc-z"
    assert row["24h"]["refused"] == 1 and row["24h"]["refused_share"] is None
    assert row["7d"] == {
        "records": 0,
        "refused": 0,
        "held": 0,
        "refused_share": None,
        "held_share": None,
        "reasons": [],
    }
