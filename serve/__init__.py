"""loraplex serve."""
