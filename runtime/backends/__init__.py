"""Model backends behind the engine contract."""
