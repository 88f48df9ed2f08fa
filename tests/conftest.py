"""Fixtures of the whole suite: the private Dovecot and the test databases."""

pytest_plugins = ["tests.harness.fixtures", "tests.harness.database"]
