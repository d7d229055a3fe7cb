"""Adapters from the papers that PEFT does not ship, one file each."""
