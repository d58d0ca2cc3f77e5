"""Typed errors: every failed call raises a `ReflexError` carrying the gRPC code and the
server's message.

The subclasses are the codes a robot program branches on: `InvalidArgument` (a bug in the
observation: wrong state length, undecodable image, unknown camera), `Unavailable` (no
server: restarting, socket gone), `DeadlineExceeded`, `ResourceExhausted` (the server's
inference queue is full), `Unauthenticated` (token missing or wrong). Any other code is a
plain `ReflexError`.
"""

from __future__ import annotations

import re

import grpc


class ReflexError(Exception):
    """A reflex call failed. `code` is the gRPC status code, `details` the server's message."""

    code: grpc.StatusCode
    details: str

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(ReflexError):
    """The server refused the request (INVALID_ARGUMENT); `details` names the field."""


class Unavailable(ReflexError):
    """No server answered (UNAVAILABLE), after the client's retries."""


class DeadlineExceeded(ReflexError):
    """The call did not finish within its deadline (DEADLINE_EXCEEDED)."""


class ResourceExhausted(ReflexError):
    """The server's inference queue is full, or a message is over a size limit."""


class Unauthenticated(ReflexError):
    """The bearer token is missing or wrong (UNAUTHENTICATED)."""


class PermissionDenied(ReflexError):
    """The server refused the caller (PERMISSION_DENIED)."""


_BY_CODE: dict[grpc.StatusCode, type[ReflexError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}

_BY_NAME: dict[str, grpc.StatusCode] = {c.name: c for c in grpc.StatusCode}


def error_for(code: grpc.StatusCode, details: str) -> ReflexError:
    """The typed exception for `code`."""
    return _BY_CODE.get(code, ReflexError)(code, details)


def from_rpc_error(e: grpc.RpcError) -> ReflexError:
    """Translates a grpcio error (sync or aio) into a typed exception."""
    # grpc.RpcError itself has no accessors; the errors grpcio raises are also grpc.Call.
    code_fn, details_fn = getattr(e, "code", None), getattr(e, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else str(e)
    return error_for(code or grpc.StatusCode.UNKNOWN, details or "")


def from_code_name(name: str, message: str) -> ReflexError:
    """The typed exception for an `ActError` of ActStream: `code` is a name such as
    "INVALID_ARGUMENT"; earlier servers sent tonic's spelling, "InvalidArgument", which is
    read too."""
    key = name if "_" in name or name.isupper() else re.sub(r"(?<!^)(?=[A-Z])", "_", name)
    return error_for(_BY_NAME.get(key.upper(), grpc.StatusCode.UNKNOWN), message)
