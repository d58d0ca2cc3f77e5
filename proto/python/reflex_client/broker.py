"""`ChunkBroker`: one action per control tick from a stream of action chunks, fetched in
the background so the control loop never waits on the network.

The model answers an observation with a chunk of `chunk_size` actions, action `i` meant
for the `i`-th tick after the observation. The broker keeps a *plan*, actions indexed by
tick. `step(obs)` hands out the plan's action for the current tick and stores `obs` as the
latest observation; a worker thread sends the latest observation when the plan's remaining
horizon falls to `prefetch_at` plus the ticks the measured round trip takes (the largest
of the last 16), and merges the answer:

- A chunk for the observation of tick `t0` covers ticks `t0 … t0+n-1`; the ticks that went
  by while it was computed are dropped (this is the latency compensation), the rest goes
  into the plan: `aggregate="latest"` replaces the plan from there on, `"weighted"` blends
  the ticks both cover (`new_weight` · new + (1 − `new_weight`) · old), as LeRobot's
  `RobotClient` does with its `weighted_average`.
- A tick with no planned action is a *stall*: `on_stall(Stall)` is called in the control
  thread and returns the action to use (default: hold the last action; `None` means "send
  nothing"). Errors, deadline misses and an unreachable server only ever end up here: the
  worker counts them, backs off, and asks again with the newest observation; no exception
  from the connection reaches `step()`.
- `must_go=True` marks an observation the server must act on (a new instruction, an
  episode start): it is sent even when the plan is full, in order, never replaced by a
  newer observation, and its chunk is merged like any other.

`step()` takes one lock held only for O(chunk) numpy work, so a tick costs microseconds
whatever the network does. `run()` is a drift-free rate loop around `step()` that also
counts missed ticks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Union

import grpc
import numpy as np
import numpy.typing as npt

from .client import Client, Retry
from .errors import ReflexError, error_for
from .messages import Chunk, ModelInfo, Observation

__all__ = ["BrokerStats", "ChunkBroker", "LoopReport", "Stall"]

log = logging.getLogger("reflex_client.broker")

Action = npt.NDArray[np.float32]
Aggregate = Union[Literal["latest", "weighted"], Callable[[Action, Action], Action]]
StallReason = Literal["no_chunk", "late", "error"]


@dataclass(frozen=True, slots=True)
class Stall:
    """A tick for which the plan has no action."""

    #: The tick (0-based count of `step()` calls).
    tick: int
    #: "no_chunk": nothing was received yet; "late": a request is in flight but its chunk
    #: is not back in time; "error": the last request failed (`error` says how).
    reason: StallReason
    #: The failure of the last request, when it failed (Unavailable, DeadlineExceeded, …).
    error: ReflexError | None
    #: The action handed out at the last tick, if any.
    last_action: Action | None
    #: Consecutive stalled ticks including this one.
    ticks_stalled: int


def hold_last_action(stall: Stall) -> Action | None:
    """The default `on_stall`: keep commanding the last action."""
    return stall.last_action


@dataclass(slots=True)
class BrokerStats:
    """Counters since the broker started (read them any time; a snapshot is `stats()`)."""

    ticks: int = 0
    #: Ticks served from the plan.
    fresh_ticks: int = 0
    #: Ticks handed to `on_stall`.
    stalled_ticks: int = 0
    requests: int = 0
    chunks: int = 0
    errors: int = 0
    #: Chunks that came back after every one of their ticks had passed.
    stale_chunks: int = 0
    #: Actions dropped because their tick had passed when the chunk arrived.
    skipped_actions: int = 0
    must_go_sent: int = 0
    last_error: ReflexError | None = None
    #: The last request's time from picking up its observation to its chunk (encoding
    #: included), in ms.
    last_round_trip_ms: float = math.nan
    errors_by_code: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LoopReport:
    """What `run()` measured."""

    ticks: int
    #: Schedule slots skipped because a tick started more than one period late.
    missed_ticks: int
    fresh_ticks: int
    stalled_ticks: int
    duration_s: float
    #: Ticks per second actually run.
    rate_hz: float
    #: How late ticks started against their schedule (ms).
    lateness_p50_ms: float
    lateness_p99_ms: float
    lateness_max_ms: float
    #: Time inside `step()` per tick (ms).
    step_p50_ms: float
    step_p99_ms: float
    step_max_ms: float


@dataclass(slots=True)
class _Pending:
    obs: Observation
    tick: int
    must_go: bool


class ChunkBroker:
    """Turns action chunks into one action per control tick without blocking the loop.

    Args:
        client: a connected `Client`.
        control_hz: the control loop's rate; ticks are 1/control_hz apart.
        prefetch_at: remaining actions (beyond the round trip's worth) at which the next
            chunk is requested: an int count, or a float in (0, 1] as a fraction of the
            chunk (LeRobot's `chunk_size_threshold`). Default 0.5.
        aggregate: "latest" (a new chunk replaces the plan), "weighted" (blend where
            chunks overlap), or a function `(old, new) -> merged` over the overlapping
            rows.
        new_weight: the new chunk's weight for "weighted".
        on_stall: called in the control thread for a tick with no planned action; returns
            the action to use, or None. Default: hold the last action.
        deadline_s: deadline of each request, retries included. Default: one chunk's
            duration (a chunk that comes back later has no tick left to serve).
        initial_action: what the default `on_stall` holds before the first chunk.
        retry: how the worker's calls retry an unreachable server (default: the client's).
    """

    def __init__(
        self,
        client: Client,
        control_hz: float,
        *,
        prefetch_at: float = 0.5,
        aggregate: Aggregate = "latest",
        new_weight: float = 0.7,
        on_stall: Callable[[Stall], Action | None] = hold_last_action,
        deadline_s: float | None = None,
        initial_action: npt.ArrayLike | None = None,
        retry: Retry | None = None,
        info: ModelInfo | None = None,
    ) -> None:
        if control_hz <= 0:
            raise ValueError(f"control_hz must be > 0, not {control_hz}")
        if isinstance(aggregate, str) and aggregate not in ("latest", "weighted"):
            raise ValueError(f'aggregate must be "latest", "weighted" or a function, not {aggregate!r}')
        if not 0.0 <= new_weight <= 1.0:
            raise ValueError(f"new_weight must be in [0, 1], not {new_weight}")
        self.client = client
        self.info = info if info is not None else client.info()
        self.control_hz = float(control_hz)
        self.period_s = 1.0 / self.control_hz
        n = self.info.chunk_size
        if isinstance(prefetch_at, float) and 0.0 < prefetch_at <= 1.0:
            self.prefetch_actions = max(1, round(prefetch_at * n))
        elif prefetch_at >= 0 and float(prefetch_at).is_integer():
            self.prefetch_actions = int(prefetch_at)
        else:
            raise ValueError(
                f"prefetch_at is an action count (int) or a fraction in (0, 1], not {prefetch_at}"
            )
        self.aggregate = aggregate
        self.new_weight = new_weight
        self.on_stall = on_stall
        self.deadline_s = deadline_s if deadline_s is not None else n / self.control_hz
        self.retry = retry
        d = self.info.action_dim
        self._last_action: Action | None = (
            None
            if initial_action is None
            else np.asarray(initial_action, dtype=np.float32).reshape(d).copy()
        )
        self._plan: Action = np.zeros((0, d), dtype=np.float32)
        self._plan_start = 0
        self._tick = 0
        self._latest: _Pending | None = None
        self._must_go: deque[_Pending] = deque()
        self._in_flight: _Pending | None = None
        self._want = False
        self._failing = False
        self._stall_run = 0
        self._rtts: deque[float] = deque(maxlen=16)
        self._stats = BrokerStats()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._not_before = 0.0
        self._worker = threading.Thread(target=self._work, name="reflex-broker", daemon=True)
        self._worker.start()

    # -- the control thread's side ---------------------------------------------------------

    def step(self, obs: Observation | None = None, *, must_go: bool = False) -> Action | None:
        """One control tick: records `obs` as the newest observation and returns this tick's
        action (float32, `action_dim`). Never waits on the network; None only when nothing
        has been received yet and `on_stall` gives nothing."""
        with self._lock:
            tick = self._tick
            self._tick += 1
            if obs is not None:
                self._observe_locked(obs, tick, must_go)
            idx = tick - self._plan_start
            action: Action | None = self._plan[idx].copy() if 0 <= idx < len(self._plan) else None
            self._stats.ticks += 1
            remaining = len(self._plan) - (idx + 1) if action is not None else 0
            if self._in_flight is None and remaining <= self._lead_locked():
                self._want = True
                self._wake.notify()
            if action is not None:
                self._stats.fresh_ticks += 1
                self._stall_run = 0
                self._last_action = action
                return action
            self._stats.stalled_ticks += 1
            self._stall_run += 1
            stall = Stall(
                tick=tick,
                reason=(
                    "error"
                    if self._failing
                    else "late" if self._in_flight is not None or self._stats.chunks else "no_chunk"
                ),
                error=self._stats.last_error if self._failing else None,
                last_action=self._last_action,
                ticks_stalled=self._stall_run,
            )
        # The hook runs outside the lock: the worker can merge while user code runs.
        held = self.on_stall(stall)
        if held is None:
            return None
        out: Action = np.asarray(held, dtype=np.float32)
        with self._lock:
            self._last_action = out
        return out

    def observe(self, obs: Observation, *, must_go: bool = False) -> None:
        """Records an observation without ticking (for loops that observe and act apart)."""
        with self._lock:
            self._observe_locked(obs, self._tick, must_go)

    def _observe_locked(self, obs: Observation, tick: int, must_go: bool) -> None:
        p = _Pending(obs, tick, must_go)
        if must_go:
            self._must_go.append(p)
            self._wake.notify()
        else:
            self._latest = p

    def _lead_locked(self) -> int:
        """Actions that must remain when a request leaves: the threshold plus the ticks the
        slowest recent round trip spans."""
        rtt = max(self._rtts) if self._rtts else 0.0
        return self.prefetch_actions + math.ceil(rtt * self.control_hz) + 1

    @property
    def tick(self) -> int:
        """Ticks run so far."""
        return self._tick

    def remaining(self) -> int:
        """Planned actions left from the next tick on."""
        with self._lock:
            return max(0, self._plan_start + len(self._plan) - self._tick)

    def stats(self) -> BrokerStats:
        """A snapshot of the counters."""
        with self._lock:
            return dataclasses.replace(
                self._stats, errors_by_code=dict(self._stats.errors_by_code)
            )

    def prime(self, obs: Observation, timeout_s: float | None = None) -> Chunk:
        """Blocks until the chunk for `obs` is in the plan: call it once before the loop
        starts, so the first tick has an action. Raises the call's `ReflexError`."""
        with self._lock:
            tick = self._tick
            self._stats.requests += 1
        chunk = self.client.act_observation(obs, timeout_s=timeout_s or self.deadline_s)
        with self._lock:
            # Not timed: a first call pays for connecting and a cold server, and one slow
            # sample would set the lead for the next 16 chunks.
            self._merge_locked(chunk, tick, math.nan)
        return chunk

    def reset(self) -> None:
        """Drops the plan and pending observations (a new episode); the tick count goes on."""
        with self._lock:
            self._plan = self._plan[:0]
            self._plan_start = self._tick
            self._latest = None
            self._must_go.clear()

    def close(self) -> None:
        """Stops the worker (a request in flight finishes or hits its deadline first)."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        self._worker.join(timeout=self.deadline_s + 1.0)

    def __enter__(self) -> ChunkBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the worker --------------------------------------------------------------------

    def _work(self) -> None:
        backoff = Retry() if self.retry is None else self.retry
        delays = backoff.delays()
        while True:
            with self._lock:
                while not self._closed:
                    if self._must_go or (self._want and self._latest is not None):
                        # After a failure, wait out the backoff even though every stalled
                        # tick asks again.
                        left = self._not_before - time.monotonic()
                        if left <= 0:
                            break
                        self._wake.wait(left)
                    else:
                        self._wake.wait()
                if self._closed:
                    return
                if self._must_go:
                    p = self._must_go.popleft()
                    self._stats.must_go_sent += 1
                else:
                    p = self._latest  # type: ignore[assignment]
                    self._latest = None
                self._want = False
                self._in_flight = p
                self._stats.requests += 1
            t0 = time.perf_counter()
            try:
                chunk = self.client.act_observation(p.obs, timeout_s=self.deadline_s)
                err = None
            except ReflexError as e:
                err = e
            except Exception as e:  # encoding a frame, a closed channel: the loop goes on
                err = error_for(grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}")
            # Logged after the lock is released: a handler can do I/O (a file, journald)
            # and step() must never wait for it.
            note: str | None = None
            failed_now = False
            with self._lock:
                self._in_flight = None
                if err is None:
                    self._merge_locked(chunk, p.tick, time.perf_counter() - t0)
                    if self._failing:
                        note = "reflex broker: chunks flowing again"
                    self._failing = False
                    delays = backoff.delays()
                    pause = 0.0
                else:
                    s = self._stats
                    s.errors += 1
                    s.last_error = err
                    s.errors_by_code[err.code.name] = s.errors_by_code.get(err.code.name, 0) + 1
                    failed_now = not self._failing
                    self._failing = True
                    if p.must_go:  # the server must act on it: send it again first
                        self._must_go.appendleft(p)
                    elif self._latest is None:
                        self._latest = p
                    self._want = True
                    pause = next(delays)
                self._not_before = time.monotonic() + pause
            if failed_now:
                log.warning("reflex broker: request failed, retrying: %s", err)
            elif note is not None:
                log.info(note)

    def _merge_locked(self, chunk: Chunk, obs_tick: int, took_s: float | None = None) -> None:
        """Puts `chunk`, answered for the observation of `obs_tick`, into the plan.
        `took_s` is the whole request, frame encoding included: what the lead must cover
        (None or NaN: not a sample)."""
        s = self._stats
        s.chunks += 1
        if took_s is not None and not math.isnan(took_s):
            s.last_round_trip_ms = took_s * 1e3
            self._rtts.append(took_s)
        now = self._tick  # the next tick step() will serve
        skip = max(0, now - obs_tick)
        new = chunk.actions[skip:]
        s.skipped_actions += min(skip, len(chunk.actions))
        if len(new) == 0:
            s.stale_chunks += 1
            return
        start = obs_tick + skip
        if self.aggregate == "latest":
            self._plan, self._plan_start = new, start
            return
        old_from = start - self._plan_start
        old = self._plan[old_from:] if old_from >= 0 else self._plan[:0]
        k = min(len(old), len(new))
        if k:
            merged = new.copy()
            if self.aggregate == "weighted":
                w = self.new_weight
                merged[:k] = w * new[:k] + (1.0 - w) * old[:k]
            else:
                merged[:k] = self.aggregate(old[:k], new[:k])
            new = merged
        self._plan, self._plan_start = new, start

    # -- a rate loop -------------------------------------------------------------------

    def run(
        self,
        observe: Callable[[], Observation | None],
        actuate: Callable[[Action], None],
        *,
        duration_s: float | None = None,
        ticks: int | None = None,
        stop: threading.Event | None = None,
    ) -> LoopReport:
        """Runs the control loop at `control_hz`: each tick calls `observe()`, `step()` and
        `actuate(action)` (skipped when there is no action), then sleeps until the next
        slot of a fixed schedule (no drift). A tick that starts more than one period late
        skips the slots it missed, counted in `missed_ticks`. Ends after `duration_s`,
        `ticks` ticks, or when `stop` is set."""
        if duration_s is None and ticks is None and stop is None:
            raise ValueError("run() needs duration_s, ticks or stop")
        period = self.period_s
        lateness: list[float] = []
        steps: list[float] = []
        missed = 0
        before = self.stats()
        t_start = time.perf_counter()
        slot = t_start
        n = 0
        while True:
            now = time.perf_counter()
            if (ticks is not None and n >= ticks) or (
                duration_s is not None and slot - t_start >= duration_s - 1e-9
            ) or (stop is not None and stop.is_set()):
                break
            late = now - slot
            if late >= period:
                skipped = int(late // period)
                missed += skipped
                slot += skipped * period
                late = now - slot
            lateness.append(late)
            obs = observe()
            t0 = time.perf_counter()
            action = self.step(obs)
            steps.append(time.perf_counter() - t0)
            if action is not None:
                actuate(action)
            n += 1
            slot += period
            pause = slot - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        elapsed = time.perf_counter() - t_start
        after = self.stats()
        lat = np.asarray(lateness or [0.0]) * 1e3
        st = np.asarray(steps or [0.0]) * 1e3
        return LoopReport(
            ticks=n,
            missed_ticks=missed,
            fresh_ticks=after.fresh_ticks - before.fresh_ticks,
            stalled_ticks=after.stalled_ticks - before.stalled_ticks,
            duration_s=elapsed,
            rate_hz=n / elapsed if elapsed > 0 else 0.0,
            lateness_p50_ms=float(np.percentile(lat, 50)),
            lateness_p99_ms=float(np.percentile(lat, 99)),
            lateness_max_ms=float(lat.max()),
            step_p50_ms=float(np.percentile(st, 50)),
            step_p99_ms=float(np.percentile(st, 99)),
            step_max_ms=float(st.max()),
        )
