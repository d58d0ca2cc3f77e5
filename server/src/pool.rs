//! Bounded inference workers: model work runs here, off the async runtime.
//!
//! A fixed set of OS threads takes jobs from one bounded queue. `submit`
//! never waits: when the queue is full the caller gets `Busy` at once and
//! answers `RESOURCE_EXHAUSTED`, so load cannot pile up unbounded requests in
//! memory. Dropping the pool closes the queue; workers finish what is queued
//! and exit.
//!
//! One more slot is reserved for the watchdog's liveness probe
//! ([`Pool::submit_probe`]): Act calls fill at most `queue` slots, so a queue
//! full of calls cannot starve the probe and restart a server that is busy but
//! healthy. The probe does not bypass the bound either: it waits in line behind
//! the queued calls (so it only returns if the workers make progress), and at
//! most one probe is ever queued, so the channel holds at most `queue + 1` jobs.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the inference queue is full ({0} waiting); retry later")]
    Busy(usize),
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

pub struct Pool {
    tx: Option<SyncSender<Job>>,
    queue: usize,
    /// Act jobs in the channel (not yet taken by a worker); at most `queue`.
    queued: Arc<AtomicUsize>,
    /// A probe is in the channel; it owns the one reserved slot.
    probe_queued: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// `workers` threads, at most `queue` jobs waiting beyond those running.
    pub fn new(workers: usize, queue: usize) -> Pool {
        // `queue` slots for calls + 1 reserved for the liveness probe.
        let (tx, rx) = sync_channel::<Job>(queue + 1);
        // One receiver shared by all workers; the lock is held only while
        // taking a job, never while running one.
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..workers.max(1))
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("reflex-infer-{i}"))
                    .spawn(move || worker(rx))
                    .expect("spawning an inference thread")
            })
            .collect();
        Pool {
            tx: Some(tx),
            queue,
            queued: Arc::new(AtomicUsize::new(0)),
            probe_queued: Arc::new(AtomicBool::new(false)),
            workers,
        }
    }

    /// Queues `f`; its result arrives on the returned receiver.
    pub fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<oneshot::Receiver<R>, SubmitError> {
        let tx = self.tx.as_ref().ok_or(SubmitError::Closed)?;
        // Count first, then send: the count never undercounts what is in the channel, so
        // calls can never take the probe's slot.
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Busy(self.queue));
        }
        let (done, rx) = oneshot::channel();
        let queued = self.queued.clone();
        let job: Job = Box::new(move || {
            queued.fetch_sub(1, Ordering::AcqRel);
            // The caller may have gone away (client cancelled); nothing to do then.
            let _ = done.send(f());
        });
        match tx.try_send(job) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::Busy(self.queue),
                    TrySendError::Disconnected(_) => SubmitError::Closed,
                })
            }
        }
    }

    /// Queues the watchdog's liveness probe in the reserved slot (see the module docs).
    /// `Pending` while an earlier probe still waits for a worker.
    pub fn submit_probe<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<oneshot::Receiver<R>, ProbeSubmitError> {
        let tx = self.tx.as_ref().ok_or(ProbeSubmitError::Closed)?;
        if self.probe_queued.swap(true, Ordering::AcqRel) {
            return Err(ProbeSubmitError::Pending);
        }
        let (done, rx) = oneshot::channel();
        let flag = self.probe_queued.clone();
        let job: Job = Box::new(move || {
            flag.store(false, Ordering::Release);
            let _ = done.send(f());
        });
        match tx.try_send(job) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.probe_queued.store(false, Ordering::Release);
                Err(match e {
                    // Unreachable while the accounting above holds; a probe that cannot
                    // be queued is one that has not returned yet.
                    TrySendError::Full(_) => ProbeSubmitError::Pending,
                    TrySendError::Disconnected(_) => ProbeSubmitError::Closed,
                })
            }
        }
    }
}

fn worker(rx: Arc<Mutex<Receiver<Job>>>) {
    loop {
        let job = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => return,
        };
        match job {
            // A panicking job must not take the worker down with it; the
            // caller sees its oneshot dropped and reports an internal error.
            Ok(job) => {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
            Err(_) => return,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    /// Occupies the only worker until the returned sender is used.
    fn occupy(pool: &Pool) -> (oneshot::Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (release_tx, release_rx) = channel::<()>();
        let (started_tx, started_rx) = channel::<()>();
        let busy = pool
            .submit(move || {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
            })
            .unwrap();
        started_rx.recv().unwrap();
        (busy, release_tx)
    }

    #[tokio::test]
    async fn runs_jobs_and_returns_results() {
        let pool = Pool::new(2, 4);
        let a = pool.submit(|| 2 + 2).unwrap();
        assert_eq!(a.await.unwrap(), 4);
    }

    #[tokio::test]
    async fn full_queue_is_refused_immediately() {
        let pool = Pool::new(1, 1);
        let (busy, release_tx) = occupy(&pool);
        let queued = pool.submit(|| 1).unwrap();
        assert_eq!(pool.submit(|| 2).unwrap_err(), SubmitError::Busy(1));
        release_tx.send(()).unwrap();
        busy.await.unwrap();
        assert_eq!(queued.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_full_queue_does_not_starve_the_probe_and_the_probe_waits_in_line() {
        let pool = Pool::new(1, 2);
        let (busy, release_tx) = occupy(&pool);
        let order = Arc::new(Mutex::new(Vec::new()));
        let q: Vec<_> = (0..2)
            .map(|i| {
                let o = order.clone();
                pool.submit(move || o.lock().unwrap().push(i)).unwrap()
            })
            .collect();
        assert_eq!(
            pool.submit(|| ()).unwrap_err(),
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
        assert_eq!(pool.submit(|| ()).unwrap_err(), SubmitError::Busy(2));
        release_tx.send(()).unwrap();
        busy.await.unwrap();
        probe.await.unwrap();
        for r in q {
            r.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            vec![0, 1, 99],
            "the probe ran after the calls queued before it"
        );
        // Slots are given back as jobs are taken.
        pool.submit_probe(|| ()).unwrap().await.unwrap();
        let again: Vec<_> = (0..2).map(|_| pool.submit(|| ()).unwrap()).collect();
        for r in again {
            r.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_wedged_worker_never_answers_the_probe() {
        let pool = Pool::new(1, 1);
        let (release_tx, release_rx) = channel::<()>();
        let _wedged = pool.submit(move || release_rx.recv().unwrap()).unwrap();
        let probe = pool.submit_probe(|| ()).unwrap();
        let waited = tokio::time::timeout(std::time::Duration::from_millis(200), probe).await;
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

    #[tokio::test]
    async fn a_panicking_job_does_not_kill_the_worker() {
        let pool = Pool::new(1, 2);
        let bad = pool.submit(|| -> u8 { panic!("boom") }).unwrap();
        assert!(bad.await.is_err());
        assert_eq!(pool.submit(|| 5).unwrap().await.unwrap(), 5);
    }
}
