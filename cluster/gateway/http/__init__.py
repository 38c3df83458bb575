"""The OpenAI-compatible HTTP API: a FastAPI app (app.py) served by Ray Serve's HTTP proxy through an ingress
deployment (deployment.py), sharing the chat core (../chat) and the engine units with the gRPC gateway."""
