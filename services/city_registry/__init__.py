"""city_registry: the national registry of cities and data centres, and the
national read model of the federation's vouchers."""
