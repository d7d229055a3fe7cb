"""Runnable loops."""
