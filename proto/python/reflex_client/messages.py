"""The values a client hands back and takes: `ModelInfo`, `Chunk` (with its `Latency`)
and `Observation`, plain frozen dataclasses converted from the wire messages once."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import numpy.typing as npt

from ._pb import reflex_pb2 as pb
from .errors import ReflexError, from_code_name
from .images import Frame
from .wire import actions_from_wire, chunk_actions

#: Robot state: a sequence of floats or a 1-D array of length `state_dim`.
State = Union[Sequence[float], npt.NDArray[np.floating]]
#: Frames by camera name (`{"base": frame}`), or in the model's camera order.
Images = Union[Mapping[str, Frame], Sequence[Frame]]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the server has loaded and what it expects (GetModelInfo)."""

    cameras: tuple[str, ...]
    image_height: int
    image_width: int
    state_dim: int
    action_dim: int
    #: Actions per chunk (`num_actions` of every Act answer).
    chunk_size: int
    denoise_steps: int
    model_hash: str
    config_hash: str
    model_type: str
    export_kind: str
    embodiment: str
    mode: str
    reflex_version: str
    session_id: str
    max_instruction_tokens: int
    #: Width of one row of an explicit `noise` (the graph's padded action width).
    noise_width: int = 0
    #: What describes the export: format, tokenizer and tokenizer_hash, stats_source,
    #: image_range, noise policy, and for a seed-tool export source and seed_quirks.
    export: Mapping[str, str] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the model takes; arrays are resized to this before encoding."""
        return (self.image_height, self.image_width)

    @classmethod
    def from_pb(cls, m: pb.ModelInfo) -> ModelInfo:
        return cls(
            cameras=tuple(m.cameras),
            image_height=m.image_height,
            image_width=m.image_width,
            state_dim=m.state_dim,
            action_dim=m.action_dim,
            chunk_size=m.chunk_size,
            denoise_steps=m.denoise_steps,
            model_hash=m.model_hash,
            config_hash=m.config_hash,
            model_type=m.model_type,
            export_kind=m.export_kind,
            embodiment=m.embodiment,
            mode=m.mode,
            reflex_version=m.reflex_version,
            session_id=m.session_id,
            max_instruction_tokens=m.max_instruction_tokens,
            noise_width=m.noise_width,
            export=dict(m.export),
        )


@dataclass(frozen=True, slots=True)
class Latency:
    """Server-side time per stage of one call, in milliseconds (the `latency` message)."""

    total_ms: float = 0.0
    queue_ms: float = 0.0
    decode_ms: float = 0.0
    #: 0 when the prefix came from the cache.
    prefix_ms: float = 0.0
    denoise_ms: float = 0.0
    postprocess_ms: float = 0.0

    @classmethod
    def from_pb(cls, m: pb.Latency) -> Latency:
        return cls(
            m.total_ms, m.queue_ms, m.decode_ms, m.prefix_ms, m.denoise_ms, m.postprocess_ms
        )


class Chunk:
    """One Act answer: `actions[i]` is the action for the i-th control step after the
    observation, in robot units.

    Only `actions` is decoded up front; the response message is parsed when another field
    is asked for (a Chunk is made per call, and most loops only want the actions).
    """

    __slots__ = ("_error", "_msg", "_raw", "actions", "round_trip_ms")

    #: float32, shape (num_actions, action_dim), row-major as on the wire.
    actions: npt.NDArray[np.float32]
    #: Client-measured time from sending the request to decoding the answer (ms).
    round_trip_ms: float

    def __init__(
        self,
        actions: npt.NDArray[np.float32],
        msg: pb.ActResponse | None = None,
        round_trip_ms: float = math.nan,
        error: ReflexError | None = None,
        raw: bytes | None = None,
    ) -> None:
        self.actions = actions
        self._msg = msg
        self._raw = raw
        self.round_trip_ms = round_trip_ms
        self._error = error

    def _message(self) -> pb.ActResponse:
        m = self._msg
        if m is None:
            m = pb.ActResponse()
            if self._raw:
                m.ParseFromString(self._raw)
            self._msg = m
        return m

    @property
    def seq(self) -> int:
        """The server session's sequence number of this call (its trace record's `seq`)."""
        return int(self._message().seq)

    @property
    def noise_seed(self) -> int:
        """The noise seed used; send it back as `noise_seed` to get the same actions."""
        return int(self._message().noise_seed)

    @property
    def latency(self) -> Latency:
        return Latency.from_pb(self._message().latency)

    @property
    def cache(self) -> str:
        """Prefix cache status: "hit", "miss" or "n/a"."""
        return str(self._message().cache)

    @property
    def recorded(self) -> bool:
        """Whether the call was handed to the recorder."""
        return bool(self._message().recorded)

    @property
    def mode(self) -> str:
        """Engine that ran the call ("cpu", "cuda")."""
        return str(self._message().mode)

    @property
    def model_hash(self) -> str:
        return str(self._message().model_hash)

    @property
    def denoise_steps(self) -> int:
        return int(self._message().denoise.steps_used)

    @property
    def error(self) -> ReflexError | None:
        """Only on `stream()`: the typed error of a request the server refused (then there
        are no actions)."""
        return self._error

    @property
    def num_actions(self) -> int:
        return int(self.actions.shape[0])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    def raise_for_error(self) -> Chunk:
        """Raises `error` if the server refused this stream request; returns self otherwise."""
        if self._error is not None:
            raise self._error
        return self

    def __repr__(self) -> str:
        if self._error is not None:
            return f"Chunk(error={self._error!r})"
        return (
            f"Chunk(actions=<{self.actions.shape[0]}x{self.actions.shape[1]} float32>, "
            f"seq={self.seq}, noise_seed={self.noise_seed}, cache={self.cache!r}, "
            f"recorded={self.recorded}, server_ms={self._message().latency.total_ms:.3f}, "
            f"round_trip_ms={self.round_trip_ms:.3f})"
        )

    @classmethod
    def from_wire(cls, data: bytes, round_trip_ms: float = math.nan) -> Chunk:
        """From a serialized ActResponse; `actions` straight from the wire bytes."""
        actions = chunk_actions(data)
        if actions is not None:
            return cls(actions, None, round_trip_ms, None, data)
        return cls.from_pb(pb.ActResponse.FromString(data), round_trip_ms, actions_from_wire(data))

    @classmethod
    def from_pb(
        cls,
        r: pb.ActResponse,
        round_trip_ms: float = math.nan,
        actions: npt.NDArray[np.float32] | None = None,
    ) -> Chunk:
        n, d = r.num_actions, r.action_dim
        if actions is None:
            actions = np.fromiter(r.actions, dtype=np.float32, count=len(r.actions))
        if n * d == actions.size and d:
            actions = actions.reshape(n, d)
        else:  # a refused stream request (no actions) or a malformed answer
            actions = actions.reshape(0, d) if actions.size == 0 else actions.reshape(-1, 1)
        error = from_code_name(r.error.code, r.error.message) if r.HasField("error") else None
        return cls(actions, r, round_trip_ms, error)


@dataclass(frozen=True, slots=True)
class Observation:
    """One observation as `act()` takes it, for `stream()` and `ChunkBroker`.

    Arrays are referenced, not copied: hand over a fresh array per frame (as camera
    drivers do), not one buffer that is written again while the call may still read it.
    """

    images: Images
    instruction: str = ""
    state: State = ()
    episode_id: str | None = None
    noise_seed: int | None = None

