"""Client side: local training and the per-round client function."""
