"""Base models and adapters."""
