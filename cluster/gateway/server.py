"""The grpc.aio server of the gateway: DGServe, grpc.health.v1 and reflection, with message-size limits,
keepalive, API keys and TLS (`security.py`)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dgserve_client.v1 import dgserve_pb2 as pb
from dgserve_client.v1 import dgserve_pb2_grpc as pb_grpc

from .security import ApiKeyAuth, ApiKeys, StrictDecoding, server_credentials

SERVICE = pb.DESCRIPTOR.services_by_name["DGServe"].full_name  # "dgserve.v1.DGServe"


MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a whole 256K-token context as ids and text, with room


async def start_server(service, settings, max_request_bytes: int) -> tuple[grpc.aio.Server,
                                                                           health.aio.HealthServicer, int]:
    keepalive_ms = int(settings.keepalive_s * 1000)
    interceptors = [StrictDecoding()]
    if settings.auth:  # checked first: a refused call is never decoded
        interceptors.insert(0, ApiKeyAuth(ApiKeys(settings.api_keys_file, settings.api_keys_env)))
    credentials = server_credentials(settings)
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", max_request_bytes),
        ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),  # a second gateway on the same port must fail, not share it
    ])
    pb_grpc.add_DGServeServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"gateway: cannot listen on {settings.host}:{settings.port}")
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    return server, health_servicer, port


async def set_serving(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE):
        await health_servicer.set(name, status)
