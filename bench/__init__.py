"""Benchmark of the ext_authz sidecar against a no-op floor: ``python -m bench.run``."""
