"""Client and AsyncClient against the real `reflex serve`: a Unix socket with no options,
TCP with TLS and a bearer token, bad input as typed errors, deadlines, retries across a
restart, and ActStream."""

from __future__ import annotations

import asyncio
import io
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import STATE, frame
from PIL import Image

from reflex_client import (
    NO_RETRY,
    AsyncClient,
    Chunk,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    Observation,
    ReflexError,
    Unauthenticated,
    Unavailable,
)


def check_chunk(c: Chunk) -> None:
    assert c.actions.shape == (50, 7)
    assert c.actions.dtype == np.float32
    assert np.isfinite(c.actions).all() and np.abs(c.actions).sum() > 0
    assert c.latency.total_ms > 0 and c.round_trip_ms >= c.latency.total_ms * 0.5
    assert c.cache in ("hit", "miss")
    assert c.mode == "cpu" and len(c.model_hash) == 16 and c.denoise_steps == 10
    assert c.error is None


def test_unix_socket_round_trip_with_no_options(serve) -> None:
    s = serve()
    with Client(s.unix) as c:
        info = c.info()
        assert info.cameras == ("base", "wrist")
        assert info.image_size == (224, 224)
        assert (info.state_dim, info.action_dim, info.chunk_size) == (8, 7, 50)
        a = c.act({"base": frame(1)}, "pick up the red cup", STATE, noise_seed=42)
        check_chunk(a)
        assert a.noise_seed == 42 and a.recorded is False
        b = c.act({"base": frame(1)}, "pick up the red cup", STATE, noise_seed=42)
        assert b.seq == a.seq + 1
        assert b.cache == "hit", "same frame + instruction: the prefix comes from the cache"
        np.testing.assert_array_equal(a.actions, b.actions)
        other = c.act({"base": frame(1)}, "pick up the red cup", STATE)
        assert other.noise_seed != 42 and not np.array_equal(other.actions, a.actions)


def test_arrays_are_resized_and_jpeg_encoded_and_bytes_pass_through(serve) -> None:
    s = serve()
    with Client(s.unix, jpeg_quality=80) as c:
        req = c.request({"base": frame(3, 480, 640)}, "x", STATE)
        img = Image.open(io.BytesIO(req.images[0].data))
        assert img.format == "JPEG" and img.size == (224, 224)
        jpeg = req.images[0].data
        raw = c.request({"base": jpeg}, "x", STATE)
        assert raw.images[0].data == jpeg
        # Bytes and the array they were made from give the same actions.
        a = c.act({"base": frame(3, 480, 640)}, "x", STATE, noise_seed=5)
        b = c.act({"base": jpeg}, "x", STATE, noise_seed=5)
        np.testing.assert_array_equal(a.actions, b.actions)
        # Cameras go out in the model's order whatever the dict's order.
        both = c.request({"wrist": frame(4, 224, 224), "base": frame(5, 224, 224)}, "x", STATE)
        assert [i.camera for i in both.images] == ["base", "wrist"]
        check_chunk(c.act({"wrist": frame(4, 96, 128), "base": frame(5)}, "x", STATE))
        # Grayscale and RGBA frames are accepted; floats are refused with a hint.
        check_chunk(c.act([frame(6)[:, :, 0]], "x", STATE))
        rgba = np.concatenate([frame(7), np.full((480, 640, 1), 255, np.uint8)], axis=-1)
        check_chunk(c.act({"base": rgba}, "x", STATE))
        with pytest.raises(ValueError, match="uint8"):
            c.act({"base": frame(1).astype(np.float32) / 255}, "x", STATE)


def test_tls_and_token_round_trip_and_refusals(serve) -> None:
    s = serve(tls=True)
    assert s.https is not None and s.https.startswith("https://127.0.0.1:")
    with s.tls_client() as c:
        check_chunk(c.act({"base": frame(2)}, "pick", STATE, noise_seed=1))
        assert c.info().chunk_size == 50
    # The same over the Unix socket of the same server: same actions, no token needed.
    with s.client() as u:
        np.testing.assert_array_equal(
            u.act({"base": frame(2)}, "pick", STATE, noise_seed=1).actions,
            Client(s.https, token_file=s.token_file, ca_file=s.ca_file)
            .act({"base": frame(2)}, "pick", STATE, noise_seed=1)
            .actions,
        )
    wrong = s.dir / "wrong.token"
    wrong.write_text("not-the-token\n")
    with Client(s.https, token_file=wrong, ca_file=s.ca_file) as c:
        with pytest.raises(Unauthenticated) as e:
            c.act({"base": frame(2)}, "pick", STATE)
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(s.https, ca_file=s.ca_file) as c:
        with pytest.raises(Unauthenticated, match="Bearer"):
            c.info()
    # Without the test CA the certificate is not trusted: no server, after retries.
    with Client(s.https, token_file=s.token_file, timeout_s=1.0) as c:
        with pytest.raises(Unavailable):
            c.info()


@pytest.mark.parametrize("transport", ["unix", "tls"])
def test_bad_input_is_a_typed_error_with_the_servers_message(serve, transport: str) -> None:
    s = serve(tls=transport == "tls")
    c = s.client() if transport == "unix" else s.tls_client()
    with c:
        with pytest.raises(InvalidArgument) as e:
            c.act({"base": frame(1)}, "pick", STATE[:5])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "state" in e.value.details and "8" in e.value.details, e.value.details
        assert str(e.value).startswith("INVALID_ARGUMENT: ")
        with pytest.raises(InvalidArgument, match="images"):
            c.act({"base": b"this is not a jpeg"}, "pick", STATE)
        with pytest.raises(InvalidArgument, match="not a camera of this model"):
            c.act({"base": frame(1), "elbow": frame(2)}, "pick", STATE)
        # A refused call is not retried, and the client goes on working.
        t0 = time.monotonic()
        with pytest.raises(ReflexError):
            c.act({"base": frame(1)}, "pick", [])
        assert time.monotonic() - t0 < 1.0
        check_chunk(c.act({"base": frame(1)}, "pick", STATE))


def test_deadline_is_per_call_and_typed(serve) -> None:
    s = serve()
    with s.client() as c:
        c.info()
        s.server.signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded) as e:
                c.act({"base": frame(1)}, "pick", STATE, timeout_s=0.3)
            took = time.monotonic() - t0
            assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 0.25 < took < 2.0, took
        finally:
            s.server.signal(signal.SIGCONT)
        check_chunk(c.act({"base": frame(1)}, "pick", STATE, timeout_s=10))


def test_a_call_retries_until_a_restarted_server_answers_the_same_request(serve) -> None:
    s = serve()
    with s.client(timeout_s=15.0) as c:
        want = c.act({"base": frame(9)}, "pick", STATE, noise_seed=77).actions
        s.server.kill()
        with Client(s.unix, retry=NO_RETRY, timeout_s=2.0) as once:
            with pytest.raises(Unavailable) as e:
                once.info()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
        # The server comes back 1.5 s into the call; the call resends the same request.
        threading.Timer(1.5, s.server.start).start()
        t0 = time.monotonic()
        got = c.act({"base": frame(9)}, "pick", STATE, noise_seed=77)
        assert time.monotonic() - t0 > 1.4
        np.testing.assert_array_equal(got.actions, want)
        assert got.seq == 0, "a new server session numbers from 0"


def test_recorded_is_reported(serve, tmp_path) -> None:
    s = serve(extra=["--record", str(tmp_path / "traces")])
    with s.client() as c:
        # The private recorder may still be connecting at the first call: poll, bounded.
        deadline = time.monotonic() + 30
        while not c.act({"base": frame(1)}, "pick", STATE).recorded:
            assert time.monotonic() < deadline, "no call was ever recorded"
            time.sleep(0.05)


def test_stream_answers_in_order_and_a_bad_request_does_not_end_it(serve) -> None:
    s = serve(tls=True)
    obs = [
        Observation({"base": frame(1)}, "pick", STATE, noise_seed=3),
        Observation({"base": frame(1)}, "pick", STATE[:2], noise_seed=3),
        Observation({"base": frame(2)}, "place", STATE, noise_seed=4),
    ]
    with s.tls_client() as c:
        chunks = list(c.stream(obs, timeout_s=30))
        assert len(chunks) == 3
        check_chunk(chunks[0])
        assert isinstance(chunks[1].error, InvalidArgument) and "state" in chunks[1].error.details
        assert chunks[1].actions.shape[0] == 0
        with pytest.raises(InvalidArgument):
            chunks[1].raise_for_error()
        check_chunk(chunks[2])
        np.testing.assert_array_equal(
            chunks[0].actions, c.act({"base": frame(1)}, "pick", STATE, noise_seed=3).actions
        )


def test_async_client_over_unix_and_tls(serve) -> None:
    s = serve(tls=True)

    async def main() -> None:
        for ac in (
            AsyncClient(s.unix),
            AsyncClient(s.https, token_file=s.token_file, ca_file=s.ca_file),
        ):
            async with ac:
                assert await ac.health()
                info = await ac.info()
                assert info.cameras == ("base", "wrist")
                one, two = await asyncio.gather(
                    ac.act({"base": frame(1)}, "pick", STATE, noise_seed=8),
                    ac.act({"base": frame(1)}, "pick", STATE, noise_seed=8),
                )
                check_chunk(one)
                np.testing.assert_array_equal(one.actions, two.actions)
                with pytest.raises(InvalidArgument, match="state"):
                    await ac.act({"base": frame(1)}, "pick", [1.0])

                async def observations():
                    for i in range(3):
                        yield Observation({"base": frame(i)}, "pick", STATE, noise_seed=i)

                got = [ch async for ch in ac.stream(observations(), timeout_s=30)]
                assert [ch.noise_seed for ch in got] == [0, 1, 2]
                for ch in got:
                    check_chunk(ch)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_targets_are_checked_before_dialing() -> None:
    with pytest.raises(ValueError, match="https"):
        Client("http://127.0.0.1:1", ca_file="/nonexistent")
    with pytest.raises(ValueError, match="TLS"):
        Client("unix:///tmp/x.sock", ca_file="/nonexistent")
    with pytest.raises(ValueError, match="unix:///PATH"):
        Client("grpc://127.0.0.1:1")
    with pytest.raises(ValueError, match="jpeg_quality"):
        Client("unix:///tmp/x.sock", jpeg_quality=0)


def test_the_readme_control_loop_runs(serve) -> None:
    """The README's "Python client" loop, run as written with stand-ins for the robot."""
    import re

    from conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Python client", 1)[1]
    code = next(b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "ChunkBroker" in b)
    s = serve()
    commands: list[np.ndarray] = []

    class Camera:
        def read(self) -> np.ndarray:
            return frame(len(commands) % 7)

    class Robot:
        def running(self) -> bool:
            return len(commands) < 60

        def joint_state(self) -> np.ndarray:
            return STATE

        def command(self, action: np.ndarray) -> None:
            commands.append(action)

    code = code.replace("unix:///run/reflex/pi05.sock", s.unix)
    exec(compile(code, "README.md", "exec"), {"cam": Camera(), "wrist": Camera(), "robot": Robot()})
    assert len(commands) == 60 and all(a.shape == (7,) for a in commands)
