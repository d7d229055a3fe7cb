"""Engines: where client rounds run."""
