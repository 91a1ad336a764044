"""Shared test configuration. Keep it generic: fixtures of one area live in its test module."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# Virtual-time tests are CPU-bound and fast; a per-example deadline only adds flakiness on busy CI hosts.
settings.register_profile("meshmq", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("meshmq")
