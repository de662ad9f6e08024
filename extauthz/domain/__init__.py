"""The ground floor: the words every other package uses (providers and their API formats,
endpoints, route permissions, wildcard matching, the records' shapes, budgets and limits
as values, refusals, LiteLLM's special model names, the names shared with Envoy). It
imports nothing of the project's above it (tests/test_layers.py)."""
