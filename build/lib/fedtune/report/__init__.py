"""Reports: metrics log, tables, plots."""
