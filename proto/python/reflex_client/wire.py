"""The two hot paths of an Act call in protobuf wire format, by hand: encoding an
ActRequest and reading `ActResponse.actions`.

Why by hand: building the request through the generated classes (a nested `Image`
message, keyword construction, then serialization) and iterating the answer's repeated
float field cost ~25 µs and ~1 µs per float in CPython; on a cache-hit Act of ~1 ms that is
the difference between a client that costs ≤ 5 % over a raw stub and one that costs 10-20 %.
The formats are fixed by the proto (fields are never renumbered), and tests/test_wire.py
checks both against the generated classes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

# ActRequest: 1 images (Image: 1 camera, 2 data), 2 instruction, 3 state (packed float),
# 4 episode_id, 5 noise_seed (optional uint64). Tags: (field << 3) | wire type.
_T_IMAGES = b"\x0a"
_T_CAMERA = b"\x0a"
_T_DATA = b"\x12"
_T_INSTRUCTION = b"\x12"
_T_STATE = b"\x1a"
_T_EPISODE = b"\x22"
_T_SEED = b"\x28"

_U64 = 1 << 64
_F32LE = np.dtype("<f4")
# One-byte varints, prebuilt: most lengths and tags of a request are below 128.
_SMALL = [bytes((i,)) for i in range(128)]
_PACKERS: dict[int, struct.Struct] = {}


def varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def pack_floats(values: Sequence[float] | npt.NDArray[np.floating]) -> bytes:
    """Little-endian float32s, as protobuf packs a `repeated float`."""
    if not isinstance(values, np.ndarray):
        n = len(values)
        packer = _PACKERS.get(n)
        if packer is None:
            packer = _PACKERS.setdefault(n, struct.Struct(f"<{n}f"))
        try:
            return packer.pack(*values)
        except OverflowError:  # beyond float32: numpy rounds to ±inf, as protobuf does
            values = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        return values.astype(_F32LE, copy=False).ravel().tobytes()


def encode_act_request(
    images: Sequence[tuple[str, bytes]],
    instruction: str,
    state: bytes,
    episode_id: str,
    noise_seed: int | None,
) -> bytes:
    """A serialized ActRequest; `state` is already `pack_floats`'d. Fields in number order
    and proto3 defaults left out, as protobuf's own serializers write it.

    Written for few bytecodes (one-byte lengths looked up, not computed): it runs once per
    call, right after the thread woke from the previous one, when every instruction of the
    interpreter is slow."""
    small = _SMALL
    parts: list[bytes] = []
    for camera, data in images:
        cam = camera.encode()
        head = _T_CAMERA + small[len(cam)] + cam if 0 < len(cam) < 128 else (
            _T_CAMERA + varint(len(cam)) + cam if cam else b""
        )
        if data:
            dlen = varint(len(data))
            size = len(head) + 1 + len(dlen) + len(data)
            parts += (_T_IMAGES, varint(size), head, _T_DATA, dlen, data)
        else:
            parts += (_T_IMAGES, small[len(head)] if len(head) < 128 else varint(len(head)), head)
    if instruction:
        text = instruction.encode()
        n = len(text)
        parts += (_T_INSTRUCTION, small[n] if n < 128 else varint(n), text)
    if state:
        n = len(state)
        parts += (_T_STATE, small[n] if n < 128 else varint(n), state)
    if episode_id:
        ep = episode_id.encode()
        n = len(ep)
        parts += (_T_EPISODE, small[n] if n < 128 else varint(n), ep)
    if noise_seed is not None:
        if not 0 <= noise_seed < _U64:
            raise ValueError(f"noise_seed must be an unsigned 64-bit integer, not {noise_seed}")
        parts += (_T_SEED, small[noise_seed] if noise_seed < 128 else varint(noise_seed))
    return b"".join(parts)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        c = buf[i]
        i += 1
        x |= (c & 0x7F) << shift
        if c < 0x80:
            return x, i
        shift += 7


def chunk_actions(buf: bytes) -> npt.NDArray[np.float32] | None:
    """The actions of a serialized ActResponse as a writable `[num_actions, action_dim]`
    array, read without parsing the message, when it is laid out as every serializer
    writes it: field 1 (packed floats), then 2 (num_actions) and 3 (action_dim), and they
    agree. None otherwise: then parse the message (`actions_from_wire` + the fields)."""
    # Offsets: tag 0x0A, a 2-byte length (128..16383 bytes of floats), tag 0x10 and a
    # one-byte num_actions, tag 0x18 and a one-byte action_dim: every chunk of up to 4095
    # floats. Anything else takes the general reader below.
    if len(buf) < 9 or buf[0] != 0x0A or buf[2] >= 0x80 or buf[1] < 0x80:
        return _chunk_actions_general(buf)
    ln = (buf[1] & 0x7F) | (buf[2] << 7)
    i, end = 3, 3 + ln
    if len(buf) < end + 4 or buf[end] != 0x10 or buf[end + 1] >= 0x80 or buf[end + 2] != 0x18:
        return _chunk_actions_general(buf)
    n, d = buf[end + 1], buf[end + 3]
    if d >= 0x80 or n * d * 4 != ln or d == 0:
        return _chunk_actions_general(buf)
    # A bytearray copy (C, no numpy call) so the array is writable, not a view of bytes.
    return np.frombuffer(bytearray(buf[i:end]), dtype=_F32LE).reshape(n, d)


def _chunk_actions_general(buf: bytes) -> npt.NDArray[np.float32] | None:
    if buf[:1] != b"\x0a":
        return None
    ln, i = _read_varint(buf, 1)
    end = i + ln
    if buf[end : end + 1] != b"\x10":
        return None
    n, j = _read_varint(buf, end + 1)
    if buf[j : j + 1] != b"\x18":
        return None
    d, _ = _read_varint(buf, j + 1)
    if n * d * 4 != ln or d == 0:
        return None
    # A bytearray copy (C, no numpy call) so the array is writable, not a view of bytes.
    return np.frombuffer(bytearray(buf[i:end]), dtype=_F32LE).reshape(n, d)


def actions_from_wire(buf: bytes) -> npt.NDArray[np.float32]:
    """`ActResponse.actions` (field 1, packed little-endian floats) read from the serialized
    message with one numpy copy (a writable array, not a view of the bytes)."""
    # Fast path: serializers write fields in number order, so non-empty `actions` come
    # first as one packed run (tag 0x0A) not followed by another.
    if buf[:1] == b"\x0a":
        ln, i = _read_varint(buf, 1)
        end = i + ln
        if end == len(buf) or buf[end] != 0x0A:
            return np.frombuffer(buf, dtype=_F32LE, count=ln // 4, offset=i).astype(np.float32)
    parts: list[npt.NDArray[np.float32]] = []
    i, n = 0, len(buf)
    while i < n:
        tag, i = _read_varint(buf, i)
        field_no, wire = tag >> 3, tag & 7
        if wire == 2:
            ln, i = _read_varint(buf, i)
            if field_no == 1:
                parts.append(np.frombuffer(buf, dtype=_F32LE, count=ln // 4, offset=i))
            i += ln
        elif wire == 0:
            _, i = _read_varint(buf, i)
        elif wire == 5:
            if field_no == 1:  # unpacked encoding, one float per tag
                parts.append(np.frombuffer(buf, dtype=_F32LE, count=1, offset=i))
            i += 4
        elif wire == 1:
            i += 8
        else:
            raise ValueError(f"ActResponse: unexpected wire type {wire} at byte {i}")
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(parts).astype(np.float32)
