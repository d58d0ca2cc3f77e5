//! Bounded inference workers: model work runs here, off the async runtime.
//!
//! A fixed set of OS threads takes jobs from one bounded queue. A call first asks for a
//! place in the queue ([`Pool::admit`]) — before its images are decoded or hashed — and
//! gets `Busy` at once when there is none, so load cannot pile up unbounded requests in
//! memory and a refusal costs no model work. Dropping the pool closes the queue; workers
//! finish what is queued and exit.
//!
//! **Order: earliest deadline first.** A call's key is its `grpc-timeout` deadline, or,
//! without one, its arrival plus [`DEFAULT_ORDER_WINDOW`] (for ordering only: such a call
//! never expires here). Calls with equal keys run in arrival order. A call whose deadline
//! has passed when a worker takes it, or whose caller has gone away (cancelled, or timed out
//! by the transport), is not run: the worker answers [`Skipped`] and takes the next.
//!
//! **Fairness: a share per connection.** One connection may hold at most
//! `per_connection` of the `queue` places, so a client that floods one connection with
//! concurrent calls is refused beyond its share while the others still find places.
//!
//! One more slot is reserved for the watchdog's liveness probe
//! ([`Pool::submit_probe`]): Act calls fill at most `queue` places, so a queue
//! full of calls cannot starve the probe and restart a server that is busy but
//! healthy. The probe does not bypass the bound either: it is ordered like a call
//! without a deadline (so it only returns if the workers make progress), and at
//! most one probe is ever queued.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How far ahead of its arrival a call without a deadline is ordered: calls with a tighter
/// `grpc-timeout` go before it, and none waits behind deadline traffic for longer than this.
pub const DEFAULT_ORDER_WINDOW: Duration = Duration::from_secs(1);

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the inference queue is full ({0} waiting); retry later")]
    Busy(usize),
    #[error(
        "this connection already has {0} calls waiting, its share of the inference queue; retry later"
    )]
    ConnectionShare(usize),
    #[error("the server is shutting down")]
    Closed,
}

/// Why the liveness probe was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProbeSubmitError {
    #[error("the previous liveness probe is still waiting for a worker")]
    Pending,
    #[error("the server is shutting down")]
    Closed,
}

/// Why a queued call was not run.
#[derive(Debug, thiserror::Error, PartialEq, Clone, Copy)]
pub enum Skipped {
    #[error("the call's deadline passed after {waited_ms:.1} ms in the queue; it was not run")]
    DeadlineExceeded { waited_ms: f64 },
}

struct Entry {
    key: Instant,
    order: u64,
    job: Job,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.key, self.order) == (other.key, other.order)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest key must come out first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.key, other.order).cmp(&(self.key, self.order))
    }
}

/// How long a refused client is asked to wait before it calls again (gRPC's
/// `grpc-retry-pushback-ms`): adapted every [`PUSHBACK_WINDOW`] so that refusals stay
/// near [`PUSHBACK_TARGET`] per admitted call, whatever the number of clients — the cost
/// of saying no stays a small part of the work, and goodput stays at its peak.
#[derive(Debug)]
struct Pushback {
    window_start: Instant,
    admitted: u64,
    refused: u64,
    ms: f64,
}

const PUSHBACK_WINDOW: Duration = Duration::from_millis(100);
const PUSHBACK_TARGET: f64 = 0.5;
const PUSHBACK_MIN_MS: f64 = 5.0;
const PUSHBACK_MAX_MS: f64 = 2000.0;

impl Default for Pushback {
    fn default() -> Self {
        Pushback {
            window_start: Instant::now(),
            admitted: 0,
            refused: 0,
            ms: PUSHBACK_MIN_MS * 2.0,
        }
    }
}

impl Pushback {
    fn count(&mut self, refused: bool) {
        if refused {
            self.refused += 1;
        } else {
            self.admitted += 1;
        }
        let now = Instant::now();
        if now.duration_since(self.window_start) < PUSHBACK_WINDOW {
            return;
        }
        // Multiplicative steps, at most ×2 or ÷2 per window: refusals above the target
        // lengthen the wait, below it shorten it.
        let ratio = self.refused as f64 / self.admitted.max(1) as f64;
        let step = (ratio / PUSHBACK_TARGET).clamp(0.5, 2.0);
        self.ms = (self.ms * step).clamp(PUSHBACK_MIN_MS, PUSHBACK_MAX_MS);
        self.window_start = now;
        self.admitted = 0;
        self.refused = 0;
    }
}

#[derive(Default)]
struct State {
    pushback: Pushback,
    heap: BinaryHeap<Entry>,
    /// Places held by admitted calls (queued, or about to be); at most `queue`.
    reserved: usize,
    /// The places each connection holds (entries at zero are removed).
    per_conn: HashMap<u64, usize>,
    probe_queued: bool,
    closed: bool,
    order: u64,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a thread panicked holding it; the counts stay right
        // (every change is one statement).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, key: Instant, job: Job) -> Result<(), ()> {
        let mut st = self.lock();
        if st.closed {
            return Err(());
        }
        st.order += 1;
        let order = st.order;
        st.heap.push(Entry { key, order, job });
        drop(st);
        self.ready.notify_one();
        Ok(())
    }
}

pub struct Pool {
    shared: Arc<Shared>,
    queue: usize,
    per_connection: usize,
    workers: Vec<JoinHandle<()>>,
}

/// A connection, as the fairness share counts it: any number unique among the open
/// connections (see `PolicyHandle`'s connection key).
pub type ConnectionKey = u64;

/// A call's place in the queue, from [`Pool::admit`] until a worker takes it (or the slot
/// is dropped unused).
pub struct Slot {
    shared: Arc<Shared>,
    conn: Option<ConnectionKey>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.reserved -= 1;
        if let Some(c) = self.conn
            && let Some(n) = st.per_conn.get_mut(&c)
        {
            *n -= 1;
            if *n == 0 {
                st.per_conn.remove(&c);
            }
        }
    }
}

impl Pool {
    /// `workers` threads, at most `queue` calls waiting beyond those running, at most
    /// `per_connection` of them from one connection.
    pub fn new(workers: usize, queue: usize, per_connection: usize) -> Pool {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
        });
        let workers = (0..workers.max(1))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("reflex-infer-{i}"))
                    .spawn(move || worker(&shared))
                    .expect("spawning an inference thread")
            })
            .collect();
        Pool {
            shared,
            queue,
            per_connection: per_connection.max(1),
            workers,
        }
    }

    /// A place in the queue for one call of `conn` (if known), or a refusal at once. Cheap:
    /// one lock and two counters; call it before any work on the request.
    pub fn admit(&self, conn: Option<ConnectionKey>) -> Result<Slot, SubmitError> {
        let mut st = self.shared.lock();
        if st.closed {
            return Err(SubmitError::Closed);
        }
        if st.reserved >= self.queue {
            st.pushback.count(true);
            return Err(SubmitError::Busy(self.queue));
        }
        if let Some(c) = conn {
            let held = st.per_conn.entry(c).or_insert(0);
            if *held >= self.per_connection {
                // A connection over its share is told to wait too, but its refusals do not
                // lengthen everybody's wait.
                return Err(SubmitError::ConnectionShare(self.per_connection));
            }
            *held += 1;
        }
        st.pushback.count(false);
        st.reserved += 1;
        Ok(Slot {
            shared: self.shared.clone(),
            conn,
        })
    }

    /// How long a refused caller should wait before it calls again, with ±50 % jitter (so
    /// that refused clients do not come back together), in whole milliseconds.
    pub fn pushback_ms(&self) -> u64 {
        let base = self.shared.lock().pushback.ms;
        // The top 53 bits of the OS's randomness as a fraction in [0, 1).
        let unit = (reflex_engine::policy::os_random_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let jitter = 0.5 + unit;
        (base * jitter).round().max(1.0) as u64
    }

    /// The places `conn` holds now.
    pub fn held_by(&self, conn: ConnectionKey) -> usize {
        self.shared.lock().per_conn.get(&conn).copied().unwrap_or(0)
    }

    /// Queues `f` in `slot`'s place, ordered by `deadline` (see the module docs). Its
    /// result arrives on the returned receiver, or [`Skipped`] if the deadline passed
    /// before a worker took it.
    pub fn submit<R: Send + 'static>(
        &self,
        slot: Slot,
        arrived: Instant,
        deadline: Option<Instant>,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<oneshot::Receiver<Result<R, Skipped>>, SubmitError> {
        let (done, rx) = oneshot::channel();
        let key = deadline.unwrap_or(arrived + DEFAULT_ORDER_WINDOW);
        let job: Job = Box::new(move || {
            // Taken by a worker: the place in the queue is free again.
            drop(slot);
            if done.is_closed() {
                // The caller has gone (cancelled or timed out): nobody wants the answer.
                return;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                let waited_ms = now.duration_since(arrived).as_secs_f64() * 1e3;
                let _ = done.send(Err(Skipped::DeadlineExceeded { waited_ms }));
                return;
            }
            let _ = done.send(Ok(f()));
        });
        self.shared
            .push(key, job)
            .map_err(|()| SubmitError::Closed)?;
        Ok(rx)
    }

    /// Queues the watchdog's liveness probe in the reserved slot (see the module docs).
    /// `Pending` while an earlier probe still waits for a worker.
    pub fn submit_probe<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<oneshot::Receiver<R>, ProbeSubmitError> {
        {
            let mut st = self.shared.lock();
            if st.closed {
                return Err(ProbeSubmitError::Closed);
            }
            if st.probe_queued {
                return Err(ProbeSubmitError::Pending);
            }
            st.probe_queued = true;
        }
        let (done, rx) = oneshot::channel();
        let shared = self.shared.clone();
        let job: Job = Box::new(move || {
            shared.lock().probe_queued = false;
            let _ = done.send(f());
        });
        self.shared
            .push(Instant::now() + DEFAULT_ORDER_WINDOW, job)
            .map_err(|()| ProbeSubmitError::Closed)?;
        Ok(rx)
    }
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if let Some(e) = st.heap.pop() {
                    break e.job;
                }
                if st.closed {
                    return;
                }
                st = shared
                    .ready
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        // A panicking job must not take the worker down with it; the caller sees its
        // oneshot dropped and reports an internal error.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::channel;

    /// Admits and queues `f` with no deadline and no connection.
    fn sub<R: Send + 'static>(
        pool: &Pool,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<oneshot::Receiver<Result<R, Skipped>>, SubmitError> {
        let slot = pool.admit(None)?;
        pool.submit(slot, Instant::now(), None, f)
    }

    /// Occupies the only worker until the returned sender is used.
    fn occupy(
        pool: &Pool,
    ) -> (
        oneshot::Receiver<Result<(), Skipped>>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (release_tx, release_rx) = channel::<()>();
        let (started_tx, started_rx) = channel::<()>();
        let busy = sub(pool, move || {
            started_tx.send(()).unwrap();
            release_rx.recv().unwrap();
        })
        .unwrap();
        started_rx.recv().unwrap();
        (busy, release_tx)
    }

    #[tokio::test]
    async fn runs_jobs_and_returns_results() {
        let pool = Pool::new(2, 4, 4);
        let a = sub(&pool, || 2 + 2).unwrap();
        assert_eq!(a.await.unwrap(), Ok(4));
    }

    #[tokio::test]
    async fn full_queue_is_refused_immediately() {
        let pool = Pool::new(1, 1, 1);
        let (busy, release_tx) = occupy(&pool);
        let queued = sub(&pool, || 1).unwrap();
        assert_eq!(sub(&pool, || 2).unwrap_err(), SubmitError::Busy(1));
        release_tx.send(()).unwrap();
        busy.await.unwrap().unwrap();
        assert_eq!(queued.await.unwrap(), Ok(1));
    }

    /// A refusal happens at admission, before the caller did any work; a place that was
    /// admitted but never used is given back when its slot is dropped.
    #[tokio::test]
    async fn an_unused_slot_gives_its_place_back() {
        let pool = Pool::new(1, 1, 1);
        let (busy, release_tx) = occupy(&pool);
        let slot = pool.admit(None).unwrap();
        assert_eq!(pool.admit(None).err(), Some(SubmitError::Busy(1)));
        drop(slot);
        let again = sub(&pool, || 3).unwrap();
        release_tx.send(()).unwrap();
        busy.await.unwrap().unwrap();
        assert_eq!(again.await.unwrap(), Ok(3));
    }

    #[tokio::test]
    async fn calls_run_earliest_deadline_first() {
        let pool = Pool::new(1, 8, 8);
        let (busy, release_tx) = occupy(&pool);
        let order = Arc::new(Mutex::new(Vec::new()));
        let now = Instant::now();
        let push = |i: u32, deadline: Option<Duration>| {
            let o = order.clone();
            let slot = pool.admit(None).unwrap();
            pool.submit(slot, now, deadline.map(|d| now + d), move || {
                o.lock().unwrap().push(i)
            })
            .unwrap()
        };
        let rxs = vec![
            push(0, None),
            push(1, Some(Duration::from_secs(30))),
            push(2, Some(Duration::from_millis(500))),
            push(3, None),
            push(4, Some(Duration::from_secs(5))),
        ];
        release_tx.send(()).unwrap();
        busy.await.unwrap().unwrap();
        for r in rxs {
            r.await.unwrap().unwrap();
        }
        // 500 ms, then the two without a deadline (arrival + 1 s) in arrival order, 5 s, 30 s.
        assert_eq!(*order.lock().unwrap(), vec![2, 0, 3, 4, 1]);
    }

    #[tokio::test]
    async fn a_call_whose_deadline_passed_in_the_queue_is_not_run() {
        let pool = Pool::new(1, 4, 4);
        let (busy, release_tx) = occupy(&pool);
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let now = Instant::now();
        let slot = pool.admit(None).unwrap();
        let late = pool
            .submit(
                slot,
                now,
                Some(now + Duration::from_millis(20)),
                move || {
                    r.fetch_add(1, Ordering::SeqCst);
                },
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(40));
        release_tx.send(()).unwrap();
        busy.await.unwrap().unwrap();
        match late.await.unwrap() {
            Err(Skipped::DeadlineExceeded { waited_ms }) => assert!(waited_ms >= 20.0),
            other => panic!("{other:?}"),
        }
        assert_eq!(ran.load(Ordering::SeqCst), 0, "an expired call is not run");
    }

    #[tokio::test]
    async fn a_call_whose_caller_went_away_is_not_run() {
        let pool = Pool::new(1, 4, 4);
        let (busy, release_tx) = occupy(&pool);
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        drop(sub(&pool, move || r.fetch_add(1, Ordering::SeqCst)).unwrap());
        let after = sub(&pool, || 7).unwrap();
        release_tx.send(()).unwrap();
        busy.await.unwrap().unwrap();
        assert_eq!(after.await.unwrap(), Ok(7));
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn one_connection_gets_its_share_and_the_others_still_find_places() {
        let pool = Pool::new(1, 8, 2);
        let (busy, release_tx) = occupy(&pool);
        let (flood, other) = (1, 2);
        let a = pool.admit(Some(flood)).unwrap();
        let b = pool.admit(Some(flood)).unwrap();
        assert_eq!(
            pool.admit(Some(flood)).err(),
            Some(SubmitError::ConnectionShare(2))
        );
        let c = pool.admit(Some(other)).unwrap();
        assert_eq!((pool.held_by(flood), pool.held_by(other)), (2, 1));
        let now = Instant::now();
        let rx = pool.submit(a, now, None, || ()).unwrap();
        drop(b);
        assert_eq!(pool.held_by(flood), 1);
        release_tx.send(()).unwrap();
        busy.await.unwrap().unwrap();
        rx.await.unwrap().unwrap();
        assert_eq!(
            pool.held_by(flood),
            0,
            "taken by a worker: the share is free again"
        );
        drop(c);
        assert_eq!(pool.held_by(other), 0);
    }

    #[tokio::test]
    async fn a_full_queue_does_not_starve_the_probe_and_the_probe_waits_in_line() {
        let pool = Pool::new(1, 2, 2);
        let (busy, release_tx) = occupy(&pool);
        let order = Arc::new(Mutex::new(Vec::new()));
        let q: Vec<_> = (0..2)
            .map(|i| {
                let o = order.clone();
                sub(&pool, move || o.lock().unwrap().push(i)).unwrap()
            })
            .collect();
        assert_eq!(
            sub(&pool, || ()).unwrap_err(),
            SubmitError::Busy(2),
            "calls never take the probe's slot"
        );
        let o = order.clone();
        let probe = pool
            .submit_probe(move || o.lock().unwrap().push(99))
            .unwrap();
        assert_eq!(
            pool.submit_probe(|| ()).unwrap_err(),
            ProbeSubmitError::Pending,
            "one probe at a time"
        );
        assert_eq!(sub(&pool, || ()).unwrap_err(), SubmitError::Busy(2));
        release_tx.send(()).unwrap();
        busy.await.unwrap().unwrap();
        probe.await.unwrap();
        for r in q {
            r.await.unwrap().unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            vec![0, 1, 99],
            "the probe ran after the calls queued before it"
        );
        // Places are given back as jobs are taken.
        pool.submit_probe(|| ()).unwrap().await.unwrap();
        let again: Vec<_> = (0..2).map(|_| sub(&pool, || ()).unwrap()).collect();
        for r in again {
            r.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_wedged_worker_never_answers_the_probe() {
        let pool = Pool::new(1, 1, 1);
        let (release_tx, release_rx) = channel::<()>();
        let _wedged = sub(&pool, move || release_rx.recv().unwrap()).unwrap();
        let probe = pool.submit_probe(|| ()).unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(200), probe).await;
        assert!(
            waited.is_err(),
            "the probe cannot return while the only worker is stuck"
        );
        assert_eq!(
            pool.submit_probe(|| ()).unwrap_err(),
            ProbeSubmitError::Pending
        );
        release_tx.send(()).unwrap();
    }

    /// Refusals well above half the admissions lengthen the wait the refused are asked for;
    /// none shorten it, within its bounds.
    #[test]
    fn pushback_follows_the_refusal_rate() {
        let mut p = Pushback::default();
        let start = p.ms;
        for _ in 0..3 {
            for _ in 0..10 {
                p.count(false);
            }
            for _ in 0..100 {
                p.count(true);
            }
            // The window ends with the next call.
            p.window_start -= PUSHBACK_WINDOW;
            p.count(true);
        }
        assert!(
            p.ms >= start * 7.9,
            "{} after 3 windows of 10:1 refusals",
            p.ms
        );
        for _ in 0..40 {
            p.window_start -= PUSHBACK_WINDOW;
            p.count(false);
        }
        assert_eq!(p.ms, PUSHBACK_MIN_MS);
        let pool = Pool::new(1, 1, 1);
        let ms = pool.pushback_ms();
        assert!((5..=15).contains(&ms), "{ms}");
    }

    #[tokio::test]
    async fn a_panicking_job_does_not_kill_the_worker() {
        let pool = Pool::new(1, 2, 2);
        let bad = sub(&pool, || -> u8 { panic!("boom") }).unwrap();
        assert!(bad.await.is_err());
        assert_eq!(sub(&pool, || 5).unwrap().await.unwrap(), Ok(5));
    }
}
