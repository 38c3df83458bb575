"""The gRPC gateway: a Serve deployment running its own grpc.aio server (health, reflection, limits)."""
