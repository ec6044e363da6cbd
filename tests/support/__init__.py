"""What the rings of tests share, written once (STYLE.md principle 8).

- :mod:`tests.support.plugin`: the pytest plugin (registered by
  ``tests/conftest.py``): eventlet patching, PostgreSQL and SQLite databases,
  the metering service with its stand-in registry, a city's event queue;
- :mod:`tests.support.portal_app` and :mod:`tests.support.agent_api`, plugins
  too: the portal over a fake RPC client, a data centre's agent API over a
  SQLite outbox (the unit tests of both and the security ring);
- :mod:`tests.support.polling`: ``eventually``, the one poll-until-true;
- :mod:`tests.support.bus`: what the tests read from RabbitMQ (queue depths,
  acknowledged counts, draining a test queue);
- :mod:`tests.support.management`: RabbitMQ's management API;
- :mod:`tests.support.ports`: free ports for the tests' own servers;
- :mod:`tests.support.processes`: a service started as operators run it;
- :mod:`tests.support.schema`: do the migrations build the models?
- test data, factories with overrides and random ids:
  :mod:`~tests.support.metering_data` (a registered data centre, its key,
  usage records, signed messages; its stand-in registry also runs as a
  process: ``python -m tests.support.metering_data AMQP_URI``, the benches),
  :mod:`~tests.support.vouchers_data` (a test city's rules, companies,
  applications, ``usage_rated`` events), :mod:`~tests.support.vouchers_books`
  (the test city's books, and the batch-equals-one-by-one property),
  :mod:`~tests.support.federation_data` (what cities announce) and
  :mod:`~tests.support.portal_data` (the portal's token, data centres).

Importing this package imports nothing else: a bench may use the factories
without the plugin's eventlet patching.
"""
