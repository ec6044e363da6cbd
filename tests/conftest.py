"""The root of the tests: the shared fixtures are a plugin, tests/support/plugin.py."""

pytest_plugins = ["tests.support.plugin"]
