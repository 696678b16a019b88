"""The performance suite (SPEC §11): `python -m benchmarks --json [--only NAME]`."""
