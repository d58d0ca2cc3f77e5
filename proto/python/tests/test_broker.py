"""ChunkBroker against the real server: a 50 Hz loop that keeps its rate, latency
compensation and must_go checked action by action, a server killed -9 and restarted
mid-loop, and a server frozen with SIGSTOP (the realistic stall)."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
from conftest import STATE, frame

from reflex_client import Chunk, ChunkBroker, Client, LoopReport, Observation, Stall

HZ = 50.0
FRAME = frame(1, 224, 224)


def obs(seed: int | None = None, instruction: str = "pick up the red cup") -> Observation:
    return Observation({"base": FRAME}, instruction, STATE, noise_seed=seed)


def assert_step_never_waits(report: LoopReport) -> None:
    """step() holds one lock for O(chunk) numpy work and never waits on the network. A
    step that waited on a request would last until its answer or its deadline (one chunk,
    1 s here; the servers below are down or frozen for 1.5-2 s). So: the typical step short
    (p99 < 5 ms) and none anywhere near a network wait (max < 100 ms). The
    max is not held to 5 ms: on a busy two-core CI machine the OS alone has taken 20-25 ms
    from one step (CI, stop 24) while the loop kept its rate."""
    assert report.step_p99_ms < 5.0, report
    assert report.step_max_ms < 100.0, report


def test_a_50hz_loop_gets_a_fresh_action_every_tick(serve, control_priority) -> None:
    s = serve()
    with s.client() as c, ChunkBroker(c, HZ) as b:
        b.prime(obs())
        actions: list[np.ndarray] = []
        report = b.run(lambda: obs(), actions.append, duration_s=3.0)
        st = b.stats()
    assert report.ticks == len(actions) == 150 - report.missed_ticks, report
    assert report.missed_ticks <= 1 and report.stalled_ticks == 0, report
    assert report.fresh_ticks == report.ticks
    assert abs(report.rate_hz - HZ) < 0.03 * HZ, report
    assert_step_never_waits(report)
    assert all(a.shape == (7,) and a.dtype == np.float32 for a in actions)
    # 150 ticks of 50-action chunks prefetched at half a chunk: a request every ~25 ticks.
    assert 4 <= st.requests <= 10 and st.errors == 0, st


def test_chunks_are_placed_on_the_tick_of_their_observation(serve) -> None:
    """The chunk for an observation of tick t0 serves tick t0+i with its action i, the
    ticks that passed in transit skipped; must_go sends an observation although the plan
    is full; "latest" replaces the plan."""
    s = serve()
    with s.client() as c:
        chunk_a = c.act({"base": FRAME}, "pick", STATE, noise_seed=11).actions
        chunk_b = c.act({"base": FRAME}, "place", STATE, noise_seed=12).actions
        with ChunkBroker(c, HZ, prefetch_at=5) as b:
            b.prime(Observation({"base": FRAME}, "pick", STATE, noise_seed=11))
            got = [b.step() for _ in range(10)]  # no observation: nothing is requested
            np.testing.assert_array_equal(np.stack(got), chunk_a[:10])
            assert b.stats().requests == 1
            t0 = b.tick
            b.step(Observation({"base": FRAME}, "place", STATE, noise_seed=12), must_go=True)
            served = {}
            deadline = time.monotonic() + 10
            while b.stats().chunks < 2:
                assert time.monotonic() < deadline
                time.sleep(0.002)
                k = b.tick
                served[k] = b.step()
            after = {b.tick: b.step() for _ in range(5)}
            st = b.stats()
    assert st.must_go_sent == 1 and st.skipped_actions >= 1, st
    for tick, a in after.items():
        np.testing.assert_array_equal(a, chunk_b[tick - t0])
    # Until the must_go chunk arrived, ticks still came from chunk A, in step.
    for tick, a in served.items():
        ok = np.array_equal(a, chunk_a[tick]) or np.array_equal(a, chunk_b[tick - t0])
        assert ok, tick


def test_weighted_aggregation_blends_where_chunks_overlap(serve) -> None:
    s = serve()
    with s.client() as c:
        b = ChunkBroker(c, HZ, aggregate="weighted", new_weight=0.75)
        try:

            def chunk(v: float) -> Chunk:
                return Chunk(np.full((50, 7), v, np.float32))

            with b._lock:
                b._merge_locked(chunk(0.0), 0)
            for _ in range(20):
                b.step()
            with b._lock:  # a chunk for tick 10 arrives at tick 20: ticks 20..49 overlap
                b._merge_locked(chunk(4.0), 10)
            plan = [b.step() for _ in range(40)]
        finally:
            b.close()
    np.testing.assert_allclose(plan[0], 3.0)  # 0.75 * 4 + 0.25 * 0 for ticks 20..49
    np.testing.assert_allclose(plan[29], 3.0)
    np.testing.assert_allclose(plan[30], 4.0)  # ticks 50..59: only the new chunk
    np.testing.assert_allclose(plan[39], 4.0)


def test_server_killed_and_restarted_mid_loop(serve, control_priority) -> None:
    s = serve()
    stalls: list[Stall] = []
    fresh_after_restart = threading.Event()
    restarted = threading.Event()

    def on_stall(st: Stall) -> np.ndarray | None:
        stalls.append(st)
        return st.last_action

    def chaos() -> None:
        time.sleep(2.5)
        restarted.set()

    with Client(s.unix, timeout_s=2.0) as c, ChunkBroker(c, HZ, on_stall=on_stall) as b:
        b.prime(obs())
        s.server.kill_and_restart_later(kill_after_s=1.0, restart_after_s=1.5)
        t = threading.Thread(target=chaos)
        t.start()
        chunks_at_restart = [0]

        def actuate(a: np.ndarray) -> None:
            if restarted.is_set():
                if not chunks_at_restart[0]:
                    chunks_at_restart[0] = b.stats().chunks
                elif b.stats().chunks > chunks_at_restart[0]:
                    fresh_after_restart.set()

        report = b.run(obs, actuate, duration_s=6.0)
        t.join(timeout=30)
        st = b.stats()
    # A missed tick is a whole period (20 ms) without a core: the OS's doing on a busy
    # two-core machine, not the broker's (step() never waits: see assert_step_never_waits). The
    # schedule itself never drifts: ticks + missed slots = duration × rate.
    assert report.ticks + report.missed_ticks == 300 and report.missed_ticks <= 3, report
    assert abs(report.rate_hz - HZ) < 0.03 * HZ, report
    assert_step_never_waits(report)
    assert stalls, "the plan ran dry while the server was down: on_stall must fire"
    assert any(x.reason == "error" and x.error is not None for x in stalls), stalls[:3]
    assert all(x.last_action is not None for x in stalls)
    assert st.errors_by_code.get("UNAVAILABLE", 0) >= 1, st
    assert fresh_after_restart.is_set(), f"no chunk after the restart: {st}"
    assert report.fresh_ticks > report.stalled_ticks, report


def test_a_frozen_server_stalls_the_plan_not_the_loop(serve, control_priority) -> None:
    s = serve()
    stalls: list[Stall] = []

    def freeze() -> None:
        time.sleep(0.5)
        s.server.signal(signal.SIGSTOP)
        time.sleep(2.0)
        s.server.signal(signal.SIGCONT)

    with s.client() as c, ChunkBroker(c, HZ, on_stall=lambda st: stalls.append(st)) as b:
        b.prime(obs())
        t = threading.Thread(target=freeze)
        t.start()
        report = b.run(obs, lambda a: None, duration_s=5.0)
        t.join(timeout=30)
        st = b.stats()
    assert report.ticks + report.missed_ticks == 250 and report.missed_ticks <= 3, report
    assert abs(report.rate_hz - HZ) < 0.03 * HZ, report
    assert_step_never_waits(report)
    # 2 s frozen, at most ~1 s of plan: about a second of stalled ticks, none after.
    assert 20 <= len(stalls) == report.stalled_ticks <= 110, report
    assert st.errors_by_code.get("DEADLINE_EXCEEDED", 0) >= 1, st
    assert stalls[-1].tick < 200, "fresh actions again well before the end"
    assert report.fresh_ticks >= 140


def test_step_before_any_chunk_holds_the_initial_action(serve) -> None:
    s = serve()
    with s.client() as c:
        home = np.arange(7, dtype=np.float32)
        with ChunkBroker(c, HZ, initial_action=home) as b:
            np.testing.assert_array_equal(b.step(obs()), home)
        with ChunkBroker(c, HZ) as b:
            assert b.step() is None
    with pytest.raises(ValueError, match="prefetch_at"):
        ChunkBroker(c, HZ, prefetch_at=-1, info=c.info())
    with pytest.raises(ValueError, match="aggregate"):
        ChunkBroker(c, HZ, aggregate="median", info=c.info())  # type: ignore[arg-type]
