"""balf.config."""
