"""balf.cli."""
