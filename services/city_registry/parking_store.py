"""The registry's parked federation events (mixed into ``RegistryStore``,
which provides ``session``): ``services/common/parking.py``'s store on the
registry's own table."""

from __future__ import annotations

from services.city_registry.models import ParkedEvent
from services.common import parking_store


class ParkingStore(parking_store.ParkingStore):
    parked_model = ParkedEvent
