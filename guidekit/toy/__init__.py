"""The embedded toy world and model."""
