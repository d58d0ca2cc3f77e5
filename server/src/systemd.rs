//! `reflex serve` as a systemd `Type=notify` service: when it says READY=1, what keeps the
//! watchdog fed, and STOPPING=1. The protocol itself is in the `reflex-systemd` crate; this
//! module decides *when* to speak. Outside systemd (no `NOTIFY_SOCKET`) all of it is a no-op.
//!
//! - READY=1 once the model is loaded, health says SERVING and every listener is bound:
//!   connections wait in the kernel backlog until the accept loops run, so from this
//!   message on a health check succeeds (`serve::start`).
//! - WATCHDOG=1 only from [`watchdog_loop`]: every half `WatchdogSec=` it runs a real
//!   engine call through the inference pool ([`PolicyService::probe`]) and pings only if
//!   that returned, in time and without error. A wedged engine, a stuck pool or an engine
//!   that fails every call stops the pings and systemd restarts the service. Rejected: a
//!   timer that pings from the async runtime, which stays alive while every inference
//!   thread hangs.
//! - STOPPING=1 when shutdown begins; the watchdog stops with it (systemd disarms it while
//!   the unit is deactivating, and `TimeoutStopSec=` bounds the drain instead).

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reflex_systemd::State;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::service::PolicyService;

/// For `main`, before any thread starts: captures systemd's variables and removes them from
/// the environment, so a private recorder child does not take the server's notification
/// socket or watchdog for its own. See [`reflex_systemd::take_environment`].
pub use reflex_systemd::take_environment;

/// READY=1 with a status line for `systemctl status`.
pub fn ready(status: &str) {
    send(&[State::Ready, State::Status(status)]);
}

/// STOPPING=1: shutdown has begun.
pub fn stopping() {
    send(&[
        State::Stopping,
        State::Status("stopping: draining in-flight calls"),
    ]);
}

fn send(states: &[State<'_>]) {
    // Once: a broken NOTIFY_SOCKET would otherwise log on every watchdog tick.
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = reflex_systemd::notify(states)
        && !WARNED.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(error = %e, slug = "systemd-notify-failed", "cannot notify the service manager");
    }
}

/// Starts the watchdog when the service manager asked for one (`WatchdogSec=`, passed as
/// `WATCHDOG_USEC`); it runs until `stop` is cancelled.
pub fn spawn_watchdog(
    service: Arc<PolicyService>,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let interval = match reflex_systemd::watchdog() {
        Ok(Some(d)) => d,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(error = %e, slug = "watchdog-config", "watchdog variables ignored");
            return None;
        }
    };
    if !reflex_systemd::notify_enabled() {
        tracing::warn!(
            slug = "watchdog-config",
            "WATCHDOG_USEC is set but NOTIFY_SOCKET is not; no watchdog"
        );
        return None;
    }
    let period = interval / 2;
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        "watchdog on: probing the engine every half interval"
    );
    let probe = move || {
        let service = service.clone();
        async move { service.probe().await }
    };
    Some(tokio::spawn(watchdog_loop(
        period,
        probe,
        || send(&[State::Watchdog]),
        stop,
    )))
}

/// Every `period`: run `probe`, and `ping` only if it returned `Ok` within `period`.
///
/// A probe that has not returned by the next tick could not have produced a ping in time
/// anyway, so `period` is also its deadline. A timed-out probe is not abandoned by the
/// pool (it still waits for a worker); the pool queues at most one, and the next ones fail
/// at once until it has run.
pub async fn watchdog_loop<P, F, E>(
    period: Duration,
    mut probe: P,
    ping: impl Fn(),
    stop: CancellationToken,
) where
    P: FnMut() -> F,
    F: Future<Output = Result<(), E>>,
    E: Display,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(period, probe()) => r,
        };
        match outcome {
            Ok(Ok(())) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(
                        slug = "watchdog-probe-ok",
                        "the engine answers the watchdog probe again"
                    );
                }
                ping();
            }
            // Logged once per failing streak: systemd will act on the silence.
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::error!(error = %e, slug = "watchdog-probe-failed", "watchdog probe failed; not pinging systemd");
            }
            Err(_) if !failing => {
                failing = true;
                tracing::error!(
                    waited_ms = period.as_millis() as u64,
                    slug = "watchdog-probe-timeout",
                    "the engine did not answer the watchdog probe; not pinging systemd"
                );
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    const PERIOD: Duration = Duration::from_millis(20);

    /// Runs the loop for `window` with probe `n` answering `result(n)` (`None`: never);
    /// returns (pings, probes started).
    async fn run(
        window: Duration,
        result: impl Fn(usize) -> Option<Result<(), String>> + Send + 'static,
    ) -> (usize, usize) {
        let pings = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (p, c) = (pings.clone(), calls.clone());
        let task = tokio::spawn(watchdog_loop(
            PERIOD,
            move || {
                let r = result(c.fetch_add(1, Ordering::SeqCst));
                async move {
                    match r {
                        Some(r) => r,
                        // A wedged engine: the probe never returns.
                        None => std::future::pending().await,
                    }
                }
            },
            move || {
                p.fetch_add(1, Ordering::SeqCst);
            },
            stop.clone(),
        ));
        tokio::time::sleep(window).await;
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the loop stops when told")
            .unwrap();
        (pings.load(Ordering::SeqCst), calls.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn pings_about_every_period_while_the_probe_answers() {
        let (pings, calls) = run(PERIOD * 20, |_| Some(Ok(()))).await;
        // Every probe pings, except one that stopping may have cut short.
        assert!(
            pings == calls || pings + 1 == calls,
            "{pings} pings, {calls} probes"
        );
        // At most one per period; at least a few even on a loaded machine.
        assert!((5..=21).contains(&pings), "{pings} pings in 20 periods");
    }

    #[tokio::test]
    async fn a_probe_that_never_returns_stops_the_pings() {
        let (pings, calls) = run(PERIOD * 20, |n| if n < 3 { Some(Ok(())) } else { None }).await;
        assert_eq!(pings, 3);
        assert!(
            calls > 4,
            "it keeps probing ({calls}) and so would notice the engine coming back"
        );
    }

    #[tokio::test]
    async fn a_failing_engine_stops_the_pings_and_recovery_resumes_them() {
        let (pings, calls) = run(PERIOD * 30, |n| {
            if (2..6).contains(&n) {
                Some(Err("boom".into()))
            } else {
                Some(Ok(()))
            }
        })
        .await;
        assert!(calls > 7, "{calls}");
        assert!(
            pings == calls - 4 || pings == calls - 5,
            "{pings} pings, {calls} probes"
        );
    }

    #[tokio::test]
    async fn stopping_ends_the_loop_even_mid_probe() {
        // `run` fails unless the loop ends promptly; the probe it cut short never pinged.
        let (pings, calls) = run(PERIOD / 2, |_| None).await;
        assert_eq!(pings, 0);
        assert!(calls <= 1);
    }
}
