"""Metrics, logs and the decision log, tracing."""
