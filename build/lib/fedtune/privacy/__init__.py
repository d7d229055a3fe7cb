"""Privacy: accounting (dp-accounting, for the mechanism as run) and the source of DP randomness."""
