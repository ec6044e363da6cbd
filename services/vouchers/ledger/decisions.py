"""``usage_decisions``: who decided what about a rated record, and why.

Every hold, release, refusal, clawback and replay of a record is one row
(actor, reason, the subsidy it moved, the event it answered), written in the
transaction of the decision; review reads its history from here.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from services.vouchers.ledger.redemptions import Key
from services.vouchers.models import UsageDecision

# Who a decision is by when no person made it.
METERING = "metering"  # a hold metering asked for
REPLAY = "replay"  # an operator's replay (metering re-sent the record)
# usage_decisions.action
HOLD = "held"
RELEASE = "released"
REFUSE = "refused"
CLAW_BACK = "clawed_back"
REPLAYED = "replayed"


def record_decision(
    session: Session,
    key: Key,
    code,
    action,
    actor,
    reason,
    fen,
    ref,
    now: datetime,
):
    """Add the ``usage_decisions`` row of one decision about ``key``."""
    session.add(
        UsageDecision(
            datacenter_id=key[0],
            record_id=key[1],
            voucher_code=code,
            action=action,
            actor=actor[:128],
            reason=(reason or "")[:512],
            subsidy_fen=fen,
            reference=ref,
            decided_at=now,
        )
    )
