"""The Check path: request -> facts -> decision -> route -> response bytes."""
