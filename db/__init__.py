"""balf.db."""
