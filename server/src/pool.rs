//! Bounded inference workers: model work runs here, off the async runtime.
//!
//! A fixed set of OS threads takes jobs from one bounded queue. `submit`
//! never waits: when the queue is full the caller gets `Busy` at once and
//! answers `RESOURCE_EXHAUSTED`, so load cannot pile up unbounded requests in
//! memory. Dropping the pool closes the queue; workers finish what is queued
//! and exit.

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

pub struct Pool {
    tx: Option<SyncSender<Job>>,
    queue: usize,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// `workers` threads, at most `queue` jobs waiting beyond those running.
    pub fn new(workers: usize, queue: usize) -> Pool {
        let (tx, rx) = sync_channel::<Job>(queue);
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
        Pool { tx: Some(tx), queue, workers }
    }

    /// Queues `f`; its result arrives on the returned receiver.
    pub fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<oneshot::Receiver<R>, SubmitError> {
        let (done, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            // The caller may have gone away (client cancelled); nothing to do then.
            let _ = done.send(f());
        });
        let tx = self.tx.as_ref().ok_or(SubmitError::Closed)?;
        match tx.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(SubmitError::Busy(self.queue)),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Closed),
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

    #[tokio::test]
    async fn runs_jobs_and_returns_results() {
        let pool = Pool::new(2, 4);
        let a = pool.submit(|| 2 + 2).unwrap();
        assert_eq!(a.await.unwrap(), 4);
    }

    #[tokio::test]
    async fn full_queue_is_refused_immediately() {
        let pool = Pool::new(1, 1);
        let (release_tx, release_rx) = channel::<()>();
        let (started_tx, started_rx) = channel::<()>();
        // Occupy the only worker until released.
        let busy = pool
            .submit(move || {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
            })
            .unwrap();
        started_rx.recv().unwrap();
        let queued = pool.submit(|| 1).unwrap();
        assert_eq!(pool.submit(|| 2).unwrap_err(), SubmitError::Busy(1));
        release_tx.send(()).unwrap();
        busy.await.unwrap();
        assert_eq!(queued.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_panicking_job_does_not_kill_the_worker() {
        let pool = Pool::new(1, 2);
        let bad = pool.submit(|| -> u8 { panic!("boom") }).unwrap();
        assert!(bad.await.is_err());
        assert_eq!(pool.submit(|| 5).unwrap().await.unwrap(), 5);
    }
}
