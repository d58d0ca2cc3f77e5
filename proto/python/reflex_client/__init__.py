"""reflex_client: a Python client for reflex, the gRPC inference server for robot policies.

- `Client` / `AsyncClient`: `info()`, `act(images, instruction, state) -> Chunk`,
  `stream()`; Unix sockets and TCP with TLS and a bearer token; numpy frames resized and
  JPEG-encoded client-side; a deadline per call and retries that resend the same request.
- `ChunkBroker`: one action per control tick, the next chunk fetched in the background.
- `ReflexPolicy`: openpi's `infer(obs) -> dict` on reflex.
- `ReflexError` and its subclasses: failed calls, with the gRPC code and the server's
  message.

The generated protobuf modules are `reflex_client._pb.reflex_pb2` and `reflex_pb2_grpc`.
"""

from .broker import BrokerStats, ChunkBroker, LoopReport, Stall, hold_last_action
from .client import NO_RETRY, AsyncClient, Client, Retry
from .errors import (
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    ReflexError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .images import encode_frame
from .messages import Chunk, Latency, ModelInfo, Observation
from .openpi import ReflexPolicy

__version__ = "0.1.0"

__all__ = [
    "NO_RETRY",
    "AsyncClient",
    "BrokerStats",
    "Chunk",
    "ChunkBroker",
    "Client",
    "DeadlineExceeded",
    "InvalidArgument",
    "Latency",
    "LoopReport",
    "ModelInfo",
    "Observation",
    "PermissionDenied",
    "ReflexError",
    "ReflexPolicy",
    "ResourceExhausted",
    "Retry",
    "Stall",
    "Unauthenticated",
    "Unavailable",
    "encode_frame",
    "hold_last_action",
]
