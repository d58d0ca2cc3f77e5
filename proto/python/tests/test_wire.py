"""The hand-written wire paths (reflex_client.wire) against the generated classes: the
request bytes parse to the message the classes build (and are the same bytes), and the
actions read from any valid encoding of a response are the field's values."""

from __future__ import annotations

import numpy as np
import pytest

from reflex_client._pb import reflex_pb2 as pb
from reflex_client.wire import (
    actions_from_wire,
    chunk_actions,
    encode_act_request,
    pack_floats,
    varint,
)


@pytest.mark.parametrize(
    "images, instruction, state, episode, seed",
    [
        ([("base", b"\xff\xd8jpeg")], "pick up the red cup", [0.0, 0.2, -1.8, 2.0], "ep-1", 42),
        ([("base", b"x" * 300), ("wrist", b"y" * 20000)], "é ü 漢字", [1e-3] * 8, "", 0),
        ([("", b"z")], "", [], "", None),
        ([("base", b"")], "x" * 200, [float("inf"), -0.0, 3.4e38], "e" * 130, 2**64 - 1),
        ([], "", [1.0], "", 2**63),
    ],
)
def test_request_bytes_are_the_generated_serialization(images, instruction, state, episode, seed) -> None:  # type: ignore[no-untyped-def]
    ours = encode_act_request(images, instruction, pack_floats(state), episode, seed)
    want = pb.ActRequest(
        images=[pb.Image(camera=c, data=d) for c, d in images],
        instruction=instruction,
        state=state,
        episode_id=episode,
    )
    if seed is not None:
        want.noise_seed = seed
    assert pb.ActRequest.FromString(ours) == want
    assert ours == want.SerializeToString()
    assert pb.ActRequest.FromString(ours).HasField("noise_seed") == (seed is not None)


def test_state_packing() -> None:
    arr = np.array([[1.5, -2.0], [3.0, 4.25]], dtype=np.float64)
    assert pack_floats(arr) == pack_floats([1.5, -2.0, 3.0, 4.25])
    assert np.frombuffer(pack_floats([1e40]), "<f4")[0] == np.inf  # as protobuf rounds
    with pytest.raises(ValueError, match="noise_seed"):
        encode_act_request([], "", b"", "", -1)
    assert varint(300) == b"\xac\x02" and varint(0) == b"\x00"


def test_actions_from_any_valid_encoding() -> None:
    values = np.random.default_rng(0).standard_normal(350).astype(np.float32)
    r = pb.ActResponse(actions=values, num_actions=50, action_dim=7, seq=3, cache="hit")
    data = r.SerializeToString()
    got = actions_from_wire(data)
    np.testing.assert_array_equal(got, values)
    got[0] = 1.0  # writable: a copy, not a view of the bytes
    # The same field split in two packed runs, after other fields, and unpacked.
    head, tail = values[:100].tobytes(), values[100:].tobytes()
    other = pb.ActResponse(seq=3, cache="hit").SerializeToString()
    split = (
        other
        + b"\x0a" + varint(len(head)) + head
        + b"\x10\x32"
        + b"\x0a" + varint(len(tail)) + tail
    )  # fmt: skip
    np.testing.assert_array_equal(actions_from_wire(split), values)
    assert pb.ActResponse.FromString(split).seq == 3
    unpacked = b"".join(b"\x0d" + v.tobytes() for v in values[:5]) + other
    np.testing.assert_array_equal(actions_from_wire(unpacked), values[:5])
    assert actions_from_wire(other).size == 0 and actions_from_wire(b"").size == 0


def test_chunk_actions_fast_path_and_fallbacks() -> None:
    from reflex_client import Chunk

    values = np.arange(350, dtype=np.float32)
    r = pb.ActResponse(actions=values, num_actions=50, action_dim=7, seq=9, cache="miss")
    data = r.SerializeToString()
    fast = chunk_actions(data)
    assert fast is not None and fast.shape == (50, 7) and fast.flags.writeable
    np.testing.assert_array_equal(fast.ravel(), values)
    c = Chunk.from_wire(data, 1.0)
    assert c.seq == 9 and c.cache == "miss" and c.error is None
    # Shapes that disagree, or no actions: the parsed path decides.
    bad = pb.ActResponse(actions=values, num_actions=49, action_dim=7).SerializeToString()
    assert chunk_actions(bad) is None
    assert Chunk.from_wire(bad).actions.shape == (350, 1)
    err = pb.ActResponse(error=pb.ActError(code="InvalidArgument", message="state")).SerializeToString()
    assert chunk_actions(err) is None
    e = Chunk.from_wire(err)
    assert e.actions.shape[0] == 0 and e.error is not None and e.error.details == "state"


@pytest.mark.parametrize("n, d", [(2, 5), (50, 7), (100, 32), (1, 1)])
def test_chunk_actions_any_size(n: int, d: int) -> None:
    values = np.random.default_rng(n * d).standard_normal(n * d).astype(np.float32)
    data = pb.ActResponse(actions=values, num_actions=n, action_dim=d, seq=1).SerializeToString()
    got = chunk_actions(data)
    assert got is not None and got.shape == (n, d)
    np.testing.assert_array_equal(got.ravel(), values)
