"""balf.counters."""
