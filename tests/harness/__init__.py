"""Test harness: private servers (Dovecot) started on loopback for live tests and benchmarks.

Plain importable modules (no pytest needed) so that ``bench/`` scripts can start the same
servers the test suite uses; the pytest fixtures live apart in ``tests.harness.fixtures``.
"""
