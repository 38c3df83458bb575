"""dgserve client SDK: sync (`Client`) and asyncio (`aio.AsyncClient`) clients over gRPC."""

from .client import Client
from .errors import (
           ApiVersionMismatch,
           Cancelled,
           DeadlineExceeded,
           DGServeClientError,
           InvalidArgument,
           OutOfRange,
           ResourceExhausted,
           Unauthenticated,
           Unavailable,
)
from .request import API_MAJOR, build_chat_request, build_request
from .security import TLS
from .tools import run_tool_loop

__version__ = "0.1.0"
__all__ = ["API_MAJOR", "ApiVersionMismatch", "Cancelled", "Client", "DGServeClientError", "DeadlineExceeded",
           "InvalidArgument", "OutOfRange", "ResourceExhausted", "TLS", "Unauthenticated", "Unavailable",
           "build_chat_request", "build_request", "run_tool_loop"]
