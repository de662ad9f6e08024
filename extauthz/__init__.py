"""Model access control for LLM providers, enforced by Envoy's external authorization."""
