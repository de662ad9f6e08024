"""The LiteLLM-compatible admin API and its request validation."""
