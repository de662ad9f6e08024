"""Generated protobuf/gRPC modules; regenerate with `python -m extauthz.proto_gen`."""
