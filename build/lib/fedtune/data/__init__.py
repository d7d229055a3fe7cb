"""Data: sources, partitioning, per-client blocks."""
