"""The root of the tests: the shared fixtures are plugins in tests/support/:
``plugin.py`` (the bus, the databases, metering), ``portal_app.py`` (the portal
over a fake RPC client), ``agent_api.py`` (a data centre's agent API over
a SQLite outbox) and ``tls_broker.py`` (a second RabbitMQ node speaking only
TLS)."""

pytest_plugins = [
    "tests.support.plugin",
    "tests.support.portal_app",
    "tests.support.agent_api",
    "tests.support.tls_broker",
]
