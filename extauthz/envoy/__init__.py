"""Envoy's side: the rendered bootstrap and the Lua filter that splices the body's model."""
