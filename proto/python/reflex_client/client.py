"""`Client` (blocking) and `AsyncClient` (asyncio, grpc.aio): the reflex.v1.Policy calls
with numpy in and `Chunk`s out, a deadline per call, retries that resend the same request
while the server is unreachable, and typed errors.

Targets, as `reflex serve --listen` spells them:

- `unix:///run/reflex/pi05.sock` — a Unix socket; guarded by file permissions, no token
  needed. grpcio sends the socket path as the HTTP/2 `:authority`; reflex rewrites it, and
  the client also sets `grpc.default_authority=localhost` so other Rust servers accept it.
- `https://host:port` — TLS; `ca_file` is the CA that signed the server's certificate
  (default: the system's roots), `token_file` the bearer token.
- `host:port` or `http://host:port` — plaintext TCP (a loopback listener); with `ca_file`,
  a bare `host:port` uses TLS too.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np

from ._pb import reflex_pb2 as pb
from .errors import error_for, from_rpc_error
from .images import DEFAULT_JPEG_QUALITY, encode_frame
from .messages import Chunk, Images, ModelInfo, Observation, State
from .wire import encode_act_request, pack_floats

__all__ = ["AsyncClient", "Client", "Retry"]

_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# grpc.health.v1.HealthCheckResponse{status: SERVING} on the wire: field 1, varint 1.
_HEALTH_SERVING = b"\x08\x01"


@dataclass(frozen=True, slots=True)
class Retry:
    """How a call retries while the server is unreachable: the same request is sent again
    after `initial_backoff_s`, then `multiplier` times longer (±`jitter`), at most
    `max_backoff_s` apart, until it succeeds, `max_attempts` (0: no limit) is reached, or
    the call's deadline has passed. Only `codes` are retried; any other error is raised at
    once."""

    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.2
    max_attempts: int = 0
    codes: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE})
    )

    def delays(self) -> Iterator[float]:
        """The pauses between attempts (endless; the caller stops at its deadline)."""
        d = self.initial_backoff_s
        while True:
            yield d * (1.0 + self.jitter * (2.0 * random.random() - 1.0))
            d = min(d * self.multiplier, self.max_backoff_s)


#: Retry nothing: the first error is raised.
NO_RETRY = Retry(max_attempts=1)


@dataclass(frozen=True, slots=True)
class _Target:
    address: str
    tls: bool
    unix: bool


def _parse_target(target: str, ca_file: str | Path | None) -> _Target:
    if target.startswith("unix:"):
        if ca_file is not None:
            raise ValueError(f"{target}: a CA file is only for TLS over TCP (https://HOST:PORT)")
        return _Target(target, tls=False, unix=True)
    if target.startswith("https://"):
        return _Target(target[len("https://") :].rstrip("/"), tls=True, unix=False)
    if target.startswith("http://"):
        if ca_file is not None:
            raise ValueError(f"{target}: a CA file is only for TLS; use https://HOST:PORT")
        return _Target(target[len("http://") :].rstrip("/"), tls=False, unix=False)
    if "://" in target:
        raise ValueError(f"{target}: a target is unix:///PATH, https://HOST:PORT or HOST:PORT")
    return _Target(target, tls=ca_file is not None, unix=False)


def _channel_options(t: _Target, extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        # A restarted server is found again within a second, not after grpc's default
        # reconnect backoff (1 s growing to 120 s), which would outlast any robot's patience.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    if t.unix:
        opts.append(("grpc.default_authority", "localhost"))
    opts.extend(extra)
    return opts


def _read_token(token_file: str | Path | None) -> tuple[tuple[str, str], ...]:
    if token_file is None:
        return ()
    token = Path(token_file).read_text().strip()
    if not token:
        raise ValueError(f"{token_file}: the token file is empty")
    return (("authorization", f"Bearer {token}"),)


def _credentials(ca_file: str | Path | None) -> grpc.ChannelCredentials:
    roots = Path(ca_file).read_bytes() if ca_file is not None else None
    return grpc.ssl_channel_credentials(root_certificates=roots)


def _methods(channel: Any) -> tuple[Any, Any, Any, Any]:
    """The calls as multicallables of `channel` (sync or aio: both have the same factory
    methods): Act and ActStream taking and giving bytes (`wire` encodes the request and
    reads the actions), GetModelInfo, and the health check."""
    act = channel.unary_unary(
        "/reflex.v1.Policy/Act",
        request_serializer=None,
        response_deserializer=None,
        _registered_method=True,
    )
    act_stream = channel.stream_stream(
        "/reflex.v1.Policy/ActStream",
        request_serializer=None,
        response_deserializer=None,
        _registered_method=True,
    )
    info = channel.unary_unary(
        "/reflex.v1.Policy/GetModelInfo",
        request_serializer=pb.GetModelInfoRequest.SerializeToString,
        response_deserializer=pb.ModelInfo.FromString,
        _registered_method=True,
    )
    health = channel.unary_unary(_HEALTH_CHECK, request_serializer=None, response_deserializer=None)
    return act, act_stream, info, health


class _Encoder:
    """Serializes ActRequests; shared by both clients so they send identical bytes."""

    def __init__(self, jpeg_quality: int) -> None:
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be 1..100, not {jpeg_quality}")
        self.jpeg_quality = jpeg_quality

    def encode(
        self,
        info: ModelInfo | None,
        images: Images,
        instruction: str,
        state: State,
        episode_id: str | None,
        noise_seed: int | None,
    ) -> bytes:
        size = info.image_size if info is not None else None
        q = self.jpeg_quality
        if type(images) is dict or isinstance(images, Mapping):
            items = list(images.items())
            if info is not None and len(items) > 1:
                # The server takes the primary camera first: send the model's order, names
                # it does not know last (it answers those with INVALID_ARGUMENT).
                order = {c: i for i, c in enumerate(info.cameras)}
                items.sort(key=lambda kv: order.get(str(kv[0]), len(order)))
            pairs = [
                (str(cam), f if type(f) is bytes else encode_frame(f, size, q))
                for cam, f in items
            ]
        else:
            pairs = [("", encode_frame(f, size, q)) for f in images]
        return encode_act_request(
            pairs, instruction, pack_floats(state), episode_id or "", noise_seed
        )


def _needs_info(images: Images) -> bool:
    """Whether encoding needs the model's info: arrays are resized to its image size, and
    several named cameras are put in its camera order."""
    if type(images) is dict or isinstance(images, Mapping):
        if len(images) > 1:
            return True
        values: Iterable[object] = images.values()
    else:
        values = images
    for f in values:
        if isinstance(f, np.ndarray):
            return True
    return False


class Client:
    """A blocking reflex client; thread-safe (one channel, calls may overlap).

    `timeout_s` is the default deadline of a call, retries included; `retry` says how
    calls that find no server are retried (`NO_RETRY` for none). `jpeg_quality` applies to
    frames given as arrays. `options` are extra grpcio channel options.
    """

    def __init__(
        self,
        target: str,
        token_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        timeout_s: float = 5.0,
        *,
        retry: Retry = Retry(),
        jpeg_quality: int = DEFAULT_JPEG_QUALITY,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.retry = retry
        self._encoder = _Encoder(jpeg_quality)
        t = _parse_target(target, ca_file)
        self._metadata = _read_token(token_file)
        opts = _channel_options(t, options)
        self._channel = (
            grpc.secure_channel(t.address, _credentials(ca_file), options=opts)
            if t.tls
            else grpc.insecure_channel(t.address, options=opts)
        )
        self._act, self._act_stream, self._info_call, self._health = _methods(self._channel)
        self._info: ModelInfo | None = None
        self._info_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channel; calls in flight end with CANCELLED."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls ---------------------------------------------------------------------------

    def _call(self, fn: Any, req: Any, timeout_s: float | None, retry: Retry | None) -> Any:
        # The first attempt is the whole hot path of a call: kept to a few bytecodes.
        budget = self.timeout_s if timeout_s is None else timeout_s
        started = time.monotonic()
        try:
            return fn(req, timeout=budget, metadata=self._metadata)
        except grpc.RpcError as e:
            err = from_rpc_error(e)
        retry = self.retry if retry is None else retry
        deadline = started + budget
        delays = retry.delays()
        attempt = 1
        while True:
            pause = next(delays)
            if (
                err.code not in retry.codes
                or (retry.max_attempts and attempt >= retry.max_attempts)
                or time.monotonic() + pause >= deadline
            ):
                raise err from None
            time.sleep(pause)
            attempt += 1
            try:
                return fn(req, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata)
            except grpc.RpcError as e:
                err = from_rpc_error(e)

    def health(self, timeout_s: float = 1.0) -> bool:
        """True when grpc.health.v1 says SERVING (no token needed, no retries)."""
        try:
            return bool(self._health(b"", timeout=timeout_s) == _HEALTH_SERVING)
        except grpc.RpcError:
            return False

    def wait_ready(self, timeout_s: float = 30.0) -> ModelInfo:
        """Waits until the server is healthy, then returns `info()`."""
        deadline = time.monotonic() + timeout_s
        while not self.health(min(1.0, max(deadline - time.monotonic(), 0.01))):
            if time.monotonic() >= deadline:
                raise error_for(
                    grpc.StatusCode.UNAVAILABLE, f"{self.target}: not SERVING after {timeout_s} s"
                )
            time.sleep(0.02)
        return self.info(refresh=True, timeout_s=max(deadline - time.monotonic(), 1.0))

    def info(self, *, refresh: bool = False, timeout_s: float | None = None) -> ModelInfo:
        """The loaded model (GetModelInfo); fetched once and cached unless `refresh`."""
        if self._info is None or refresh:
            m = self._call(self._info_call, pb.GetModelInfoRequest(), timeout_s, None)
            with self._info_lock:
                self._info = ModelInfo.from_pb(m)
        assert self._info is not None  # set above
        return self._info

    def request(
        self,
        images: Images,
        instruction: str = "",
        state: State = (),
        *,
        episode_id: str | None = None,
        noise_seed: int | None = None,
    ) -> pb.ActRequest:
        """The ActRequest `act()` would send (arrays resized and JPEG-encoded)."""
        req = pb.ActRequest()
        req.ParseFromString(self._encode(images, instruction, state, episode_id, noise_seed))
        return req

    def _encode(
        self,
        images: Images,
        instruction: str,
        state: State,
        episode_id: str | None,
        noise_seed: int | None,
    ) -> bytes:
        if type(images) is dict and len(images) == 1:  # the common case, kept short
            ((cam, frame),) = images.items()
            if type(frame) is bytes:
                return encode_act_request(
                    ((cam, frame),), instruction, pack_floats(state), episode_id or "", noise_seed
                )
        info = self.info() if _needs_info(images) else self._info
        return self._encoder.encode(info, images, instruction, state, episode_id, noise_seed)

    def act(
        self,
        images: Images,
        instruction: str = "",
        state: State = (),
        *,
        episode_id: str | None = None,
        noise_seed: int | None = None,
        timeout_s: float | None = None,
    ) -> Chunk:
        """One observation in, one action chunk out.

        `images` maps camera names to frames: HWC uint8 arrays (resized to the model's
        size and JPEG-encoded) or encoded JPEG/PNG bytes (sent as given). Raises a
        `ReflexError` subclass; `InvalidArgument.details` names the bad field.
        """
        body = self._encode(images, instruction, state, episode_id, noise_seed)
        t0 = time.perf_counter()
        data = self._call(self._act, body, timeout_s, None)
        return Chunk.from_wire(data, (time.perf_counter() - t0) * 1e3)

    def act_observation(self, obs: Observation, *, timeout_s: float | None = None) -> Chunk:
        """`act()` with the fields of `obs`."""
        return self.act(
            obs.images,
            obs.instruction,
            obs.state,
            episode_id=obs.episode_id,
            noise_seed=obs.noise_seed,
            timeout_s=timeout_s,
        )

    def send(
        self,
        request: pb.ActRequest | bytes,
        *,
        timeout_s: float | None = None,
        retry: Retry | None = None,
    ) -> Chunk:
        """Sends a prepared ActRequest (or its serialized bytes); retried as is while the
        server is unreachable."""
        body = request if isinstance(request, bytes) else request.SerializeToString()
        t0 = time.perf_counter()
        data = self._call(self._act, body, timeout_s, retry)
        return Chunk.from_wire(data, (time.perf_counter() - t0) * 1e3)

    def stream(
        self, observations: Iterable[Observation], *, timeout_s: float | None = None
    ) -> Iterator[Chunk]:
        """ActStream: one Chunk per observation, in order, on one HTTP/2 stream.

        A request the server refuses yields a Chunk with `error` set and no actions (the
        stream goes on); a failure of the stream itself raises a `ReflexError`. Streams
        are not retried. `timeout_s` (default: none) bounds the whole stream.
        """
        sent: deque[float] = deque()
        info_box: list[ModelInfo | None] = [self._info]

        def requests() -> Iterator[bytes]:
            for o in observations:
                if info_box[0] is None and _needs_info(o.images):
                    info_box[0] = self.info()
                req = self._encoder.encode(
                    info_box[0], o.images, o.instruction, o.state, o.episode_id, o.noise_seed
                )
                sent.append(time.perf_counter())
                yield req

        call = self._act_stream(requests(), timeout=timeout_s, metadata=self._metadata)
        try:
            for resp in call:
                t0 = sent.popleft() if sent else math.nan
                yield Chunk.from_wire(resp, (time.perf_counter() - t0) * 1e3)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()


class AsyncClient:
    """The asyncio twin of `Client` (grpc.aio); create and use it inside one event loop.

    Same arguments and methods, as coroutines; `stream()` is an async iterator.
    """

    def __init__(
        self,
        target: str,
        token_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        timeout_s: float = 5.0,
        *,
        retry: Retry = Retry(),
        jpeg_quality: int = DEFAULT_JPEG_QUALITY,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.retry = retry
        self._encoder = _Encoder(jpeg_quality)
        t = _parse_target(target, ca_file)
        self._metadata = _read_token(token_file)
        opts = _channel_options(t, options)
        self._channel = (
            grpc.aio.secure_channel(t.address, _credentials(ca_file), options=opts)
            if t.tls
            else grpc.aio.insecure_channel(t.address, options=opts)
        )
        self._act, self._act_stream, self._info_call, self._health = _methods(self._channel)
        self._info: ModelInfo | None = None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, fn: Any, req: Any, timeout_s: float | None, retry: Retry | None) -> Any:
        retry = self.retry if retry is None else retry
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        delays = None
        attempt = 0
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            try:
                return await fn(req, timeout=max(left, 0.0), metadata=self._metadata)
            except grpc.RpcError as e:
                err = from_rpc_error(e)
            delays = delays or retry.delays()
            pause = next(delays)
            if (
                err.code not in retry.codes
                or (retry.max_attempts and attempt >= retry.max_attempts)
                or time.monotonic() + pause >= deadline
            ):
                raise err from None
            await asyncio.sleep(pause)

    async def health(self, timeout_s: float = 1.0) -> bool:
        """True when grpc.health.v1 says SERVING."""
        try:
            return bool(await self._health(b"", timeout=timeout_s) == _HEALTH_SERVING)
        except grpc.RpcError:
            return False

    async def wait_ready(self, timeout_s: float = 30.0) -> ModelInfo:
        """Waits until the server is healthy, then returns `info()`."""
        deadline = time.monotonic() + timeout_s
        while not await self.health(min(1.0, max(deadline - time.monotonic(), 0.01))):
            if time.monotonic() >= deadline:
                raise error_for(
                    grpc.StatusCode.UNAVAILABLE, f"{self.target}: not SERVING after {timeout_s} s"
                )
            await asyncio.sleep(0.02)
        return await self.info(refresh=True, timeout_s=max(deadline - time.monotonic(), 1.0))

    async def info(self, *, refresh: bool = False, timeout_s: float | None = None) -> ModelInfo:
        """The loaded model (GetModelInfo); fetched once and cached unless `refresh`."""
        if self._info is None or refresh:
            m = await self._call(
                self._info_call, pb.GetModelInfoRequest(), timeout_s, None
            )
            self._info = ModelInfo.from_pb(m)
        return self._info

    async def request(
        self,
        images: Images,
        instruction: str = "",
        state: State = (),
        *,
        episode_id: str | None = None,
        noise_seed: int | None = None,
    ) -> pb.ActRequest:
        """The ActRequest `act()` would send."""
        req = pb.ActRequest()
        req.ParseFromString(await self._encode(images, instruction, state, episode_id, noise_seed))
        return req

    async def _encode(
        self,
        images: Images,
        instruction: str,
        state: State,
        episode_id: str | None,
        noise_seed: int | None,
    ) -> bytes:
        info = await self.info() if _needs_info(images) else self._info
        return self._encoder.encode(info, images, instruction, state, episode_id, noise_seed)

    async def act(
        self,
        images: Images,
        instruction: str = "",
        state: State = (),
        *,
        episode_id: str | None = None,
        noise_seed: int | None = None,
        timeout_s: float | None = None,
    ) -> Chunk:
        """One observation in, one action chunk out (see `Client.act`)."""
        data = await self._encode(images, instruction, state, episode_id, noise_seed)
        return await self.send(data, timeout_s=timeout_s)

    async def send(
        self,
        request: pb.ActRequest | bytes,
        *,
        timeout_s: float | None = None,
        retry: Retry | None = None,
    ) -> Chunk:
        """Sends a prepared ActRequest (or its serialized bytes); retried as is while the
        server is unreachable."""
        body = request if isinstance(request, bytes) else request.SerializeToString()
        t0 = time.perf_counter()
        data = await self._call(self._act, body, timeout_s, retry)
        return Chunk.from_wire(data, (time.perf_counter() - t0) * 1e3)

    async def stream(
        self,
        observations: AsyncIterable[Observation] | Iterable[Observation],
        *,
        timeout_s: float | None = None,
    ) -> AsyncIterator[Chunk]:
        """ActStream (see `Client.stream`)."""
        sent: deque[float] = deque()

        async def requests() -> AsyncIterator[bytes]:
            if isinstance(observations, AsyncIterable):
                async for o in observations:
                    yield await self._encode_for_stream(o, sent)
            else:
                for o in observations:
                    yield await self._encode_for_stream(o, sent)

        call = self._act_stream(requests(), timeout=timeout_s, metadata=self._metadata)
        try:
            async for resp in call:
                t0 = sent.popleft() if sent else math.nan
                yield Chunk.from_wire(resp, (time.perf_counter() - t0) * 1e3)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def _encode_for_stream(self, o: Observation, sent: deque[float]) -> bytes:
        req = await self._encode(o.images, o.instruction, o.state, o.episode_id, o.noise_seed)
        sent.append(time.perf_counter())
        return req
