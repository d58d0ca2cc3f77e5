//! reflex-systemd: what a reflex daemon says to, and takes from, the service manager that
//! started it — readiness, watchdog pings and stopping notices over `NOTIFY_SOCKET`
//! (`sd_notify(3)`), and sockets handed over by socket activation (`sd_listen_fds(3)`).
//!
//! Pure Rust over `libc`, no libsystemd: the protocols are a datagram of `KEY=VALUE` lines and
//! a few environment variables. Both daemons use it (`reflex serve` and `reflex recorder`), so
//! it sits in its own crate rather than in either of them. Outside systemd every function
//! here is a quiet no-op: the same binary runs by hand, from a test, or under another
//! supervisor.
//!
//! **The environment is read once.** The first of [`notify`], [`watchdog`] or [`listen_fds`] captures
//! `NOTIFY_SOCKET`, `WATCHDOG_USEC`/`WATCHDOG_PID` and `LISTEN_FDS`/`LISTEN_PID`/
//! `LISTEN_FDNAMES`; the inherited descriptors are checked to be open, marked close-on-exec
//! and owned from then on. [`take_environment`] does the same and also removes the
//! variables, so a child process (the private recorder a server may start) cannot mistake
//! its parent's notification socket or watchdog for its own. Removing variables is only
//! sound while one thread runs, so that call belongs at the top of `main`; without it the
//! variables stay (harmless for `LISTEN_*` and `WATCHDOG_*`, which name the PID they are
//! for).
//!
//! [`child`] is the same relationship seen from the other side: a reflex command supervising
//! another reflex process it started (own process group, `PR_SET_PDEATHSIG`, SIGTERM then
//! SIGKILL).
//!
//! Rejected: the `sd-notify` crate — it re-reads `NOTIFY_SOCKET` on every call (so the
//! variable cannot be removed early), does not speak abstract (`@name`) sockets, and hands
//! back raw descriptors without checking what they are.

pub mod child;

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";
pub const LISTEN_FDS: &str = "LISTEN_FDS";
pub const LISTEN_PID: &str = "LISTEN_PID";
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";

/// The first inherited descriptor (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// More inherited descriptors than this is a broken environment, not a configuration.
const MAX_LISTEN_FDS: usize = 1024;

/// Something the service manager handed over that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("NOTIFY_SOCKET={value:?}: {reason}")]
    NotifySocket { value: String, reason: String },
    #[error("{var}={value:?} is not a number")]
    NotANumber { var: &'static str, value: String },
    #[error("WATCHDOG_USEC=0: a watchdog interval must be positive")]
    ZeroWatchdog,
    #[error("LISTEN_FDS={0} is more descriptors than any unit passes")]
    TooManyFds(usize),
    #[error("LISTEN_FDNAMES has {names} names for LISTEN_FDS={fds} descriptors")]
    FdNames { names: usize, fds: usize },
    #[error("inherited descriptor {fd} is not open ({reason})")]
    FdNotOpen { fd: RawFd, reason: String },
    #[error("inherited descriptor {fd} ({name}) {what}")]
    NotAUnixListener {
        fd: RawFd,
        name: String,
        what: String,
    },
}

/// A notification for the service manager (`sd_notify(3)` assignments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State<'a> {
    /// Start-up is finished: the service does its job from now on.
    Ready,
    /// Shutdown has begun.
    Stopping,
    /// Keep-alive for `WatchdogSec=`.
    Watchdog,
    /// A one-line status shown by `systemctl status` (newlines become spaces).
    Status(&'a str),
}

impl State<'_> {
    fn write(&self, out: &mut String) {
        match self {
            State::Ready => out.push_str("READY=1\n"),
            State::Stopping => out.push_str("STOPPING=1\n"),
            State::Watchdog => out.push_str("WATCHDOG=1\n"),
            State::Status(s) => {
                out.push_str("STATUS=");
                out.extend(s.chars().map(|c| if c == '\n' { ' ' } else { c }));
                out.push('\n');
            }
        }
    }
}

/// A descriptor inherited through socket activation, with its `FileDescriptorName=`.
#[derive(Debug)]
pub struct ListenFd {
    pub fd: OwnedFd,
    /// `LISTEN_FDNAMES` entry; "unknown" when the manager sent no names.
    pub name: String,
}

impl ListenFd {
    /// The descriptor as a listening `AF_UNIX` stream socket; anything else is refused.
    pub fn into_unix_listener(self) -> Result<UnixListener, EnvError> {
        let raw = self.fd.as_raw_fd();
        let bad = |what: String| EnvError::NotAUnixListener {
            fd: raw,
            name: self.name.clone(),
            what,
        };
        let domain =
            sockopt(raw, libc::SO_DOMAIN).map_err(|e| bad(format!("is not a socket ({e})")))?;
        if domain != libc::AF_UNIX {
            return Err(bad(format!(
                "is not a Unix socket (address family {domain})"
            )));
        }
        let kind = sockopt(raw, libc::SO_TYPE).map_err(|e| bad(e.to_string()))?;
        if kind != libc::SOCK_STREAM {
            return Err(bad("is not a stream socket (use ListenStream=)".into()));
        }
        if sockopt(raw, libc::SO_ACCEPTCONN).map_err(|e| bad(e.to_string()))? == 0 {
            return Err(bad("is not listening (Accept=no is required)".into()));
        }
        Ok(UnixListener::from(self.fd))
    }
}

/// What the environment said, read once (see the crate docs).
struct Captured {
    notify: Option<Result<SocketAddr, EnvError>>,
    watchdog: Result<Option<Duration>, EnvError>,
    listen: Mutex<Option<Result<Vec<ListenFd>, EnvError>>>,
}

static CAPTURED: OnceLock<Captured> = OnceLock::new();

fn captured() -> &'static Captured {
    CAPTURED.get_or_init(|| {
        let var = |k: &str| std::env::var_os(k);
        let me = std::process::id();
        Captured {
            notify: var(NOTIFY_SOCKET).map(|v| parse_notify_socket(&v)),
            watchdog: parse_watchdog(
                var(WATCHDOG_USEC).as_deref(),
                var(WATCHDOG_PID).as_deref(),
                me,
            ),
            listen: Mutex::new(Some(
                parse_listen(
                    var(LISTEN_PID).as_deref(),
                    var(LISTEN_FDS).as_deref(),
                    var(LISTEN_FDNAMES).as_deref(),
                    me,
                )
                .and_then(|names| claim_fds(LISTEN_FDS_START, names)),
            )),
        }
    })
}

/// Captures the service manager's variables (see the crate docs) and removes them from the
/// environment, so that child processes do not inherit them.
///
/// # Safety
///
/// Same as [`std::env::remove_var`]: no other thread may read or write the environment
/// meanwhile. Call it first thing in `main`, before any runtime or thread starts.
pub unsafe fn take_environment() {
    captured();
    for k in [
        NOTIFY_SOCKET,
        WATCHDOG_USEC,
        WATCHDOG_PID,
        LISTEN_FDS,
        LISTEN_PID,
        LISTEN_FDNAMES,
    ] {
        // SAFETY: the caller guarantees this thread is alone (the function's contract).
        unsafe { std::env::remove_var(k) };
    }
}

/// Whether a service manager listens for notifications (`NOTIFY_SOCKET` was set).
pub fn notify_enabled() -> bool {
    captured().notify.is_some()
}

/// Sends `states` as one datagram. `Ok(false)` when no manager listens (not under systemd,
/// or not `Type=notify`); an error when `NOTIFY_SOCKET` is malformed or the send fails.
pub fn notify(states: &[State<'_>]) -> io::Result<bool> {
    let Some(target) = &captured().notify else {
        return Ok(false);
    };
    let addr = target
        .as_ref()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut msg = String::new();
    for s in states {
        s.write(&mut msg);
    }
    // A fresh unbound socket per message: notifications are rare (seconds apart) and the
    // kernel attaches our credentials, which is how systemd checks NotifyAccess=.
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(msg.as_bytes(), addr)?;
    if sent != msg.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "notification datagram was cut short",
        ));
    }
    Ok(true)
}

/// The watchdog interval the manager expects pings within (`WatchdogSec=`), if any is for
/// this process.
pub fn watchdog() -> Result<Option<Duration>, EnvError> {
    captured().watchdog.clone()
}

/// The descriptors passed by socket activation, in order (fd 3 first); empty when none
/// were passed. The first call takes them: later calls get an empty list, so a second
/// daemon in the same process binds its own socket instead of sharing one.
pub fn listen_fds() -> Result<Vec<ListenFd>, EnvError> {
    // A poisoned lock only means another thread panicked while taking; the data is a plain Option.
    let mut slot = captured().listen.lock().unwrap_or_else(|p| p.into_inner());
    slot.take().unwrap_or(Ok(Vec::new()))
}

/// `NOTIFY_SOCKET`: an absolute path, or `@name` for the abstract namespace.
pub fn parse_notify_socket(value: &OsStr) -> Result<SocketAddr, EnvError> {
    let bytes = value.as_bytes();
    let err = |reason: &str| EnvError::NotifySocket {
        value: value.to_string_lossy().into(),
        reason: reason.into(),
    };
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(value).map_err(|e| err(&e.to_string())),
        Some(b'@') if bytes.len() > 1 => {
            SocketAddr::from_abstract_name(&bytes[1..]).map_err(|e| err(&e.to_string()))
        }
        _ => Err(err(
            "not an absolute socket path or @abstract name (vsock is not supported)",
        )),
    }
}

/// `WATCHDOG_USEC`/`WATCHDOG_PID` as `sd_watchdog_enabled(3)` reads them: no interval, or
/// one meant for another PID, is no watchdog.
pub fn parse_watchdog(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    me: u32,
) -> Result<Option<Duration>, EnvError> {
    let Some(usec) = usec else { return Ok(None) };
    let usec: u64 = number(WATCHDOG_USEC, usec)?;
    if let Some(pid) = pid
        && number::<u32>(WATCHDOG_PID, pid)? != me
    {
        return Ok(None);
    }
    if usec == 0 {
        return Err(EnvError::ZeroWatchdog);
    }
    Ok(Some(Duration::from_micros(usec)))
}

/// `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` → the names of the descriptors from fd 3 on.
/// Descriptors are meant for us only when `LISTEN_PID` is our PID.
pub fn parse_listen(
    pid: Option<&OsStr>,
    fds: Option<&OsStr>,
    names: Option<&OsStr>,
    me: u32,
) -> Result<Vec<String>, EnvError> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    if number::<u32>(LISTEN_PID, pid)? != me {
        return Ok(Vec::new());
    }
    let n: usize = number(LISTEN_FDS, fds)?;
    if n > MAX_LISTEN_FDS {
        return Err(EnvError::TooManyFds(n));
    }
    match names {
        None => Ok(vec!["unknown".to_string(); n]),
        Some(names) => {
            let names: Vec<String> = if n == 0 && names.is_empty() {
                Vec::new()
            } else {
                names
                    .to_string_lossy()
                    .split(':')
                    .map(str::to_string)
                    .collect()
            };
            if names.len() != n {
                return Err(EnvError::FdNames {
                    names: names.len(),
                    fds: n,
                });
            }
            Ok(names)
        }
    }
}

/// Checks that fds `start..` are open, marks them close-on-exec and takes ownership of them.
fn claim_fds(start: RawFd, names: Vec<String>) -> Result<Vec<ListenFd>, EnvError> {
    let fds: Vec<RawFd> = (0..names.len()).map(|i| start + i as RawFd).collect();
    // Check every one before owning any: an OwnedFd closes on drop, and closing a
    // descriptor that is not ours would be worse than refusing to start.
    for &fd in &fds {
        // SAFETY: F_GETFD/F_SETFD only read and set the descriptor's flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(EnvError::FdNotOpen {
                fd,
                reason: io::Error::last_os_error().to_string(),
            });
        }
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(EnvError::FdNotOpen {
                fd,
                reason: io::Error::last_os_error().to_string(),
            });
        }
    }
    Ok(fds
        .into_iter()
        .zip(names)
        // SAFETY: the manager passed these descriptors to this PID (LISTEN_PID matched), each
        // is open (checked above), and the capture runs once, so nothing else owns them.
        .map(|(fd, name)| ListenFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            name,
        })
        .collect())
}

fn number<T: std::str::FromStr>(var: &'static str, value: &OsStr) -> Result<T, EnvError> {
    value
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| EnvError::NotANumber {
            var,
            value: value.to_string_lossy().into(),
        })
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for writes of the sizes passed.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn notify_socket_paths_and_abstract_names() {
        let a = parse_notify_socket(OsStr::new("/run/systemd/notify")).unwrap();
        assert_eq!(
            a.as_pathname().unwrap(),
            std::path::Path::new("/run/systemd/notify")
        );
        let b = parse_notify_socket(OsStr::new("@reflex/test")).unwrap();
        assert_eq!(b.as_abstract_name().unwrap(), b"reflex/test");
        for bad in ["", "@", "relative/notify", "vsock:2:1234"] {
            assert!(
                matches!(
                    parse_notify_socket(OsStr::new(bad)),
                    Err(EnvError::NotifySocket { .. })
                ),
                "{bad:?}"
            );
        }
        let long = format!("/{}", "x".repeat(200));
        assert!(parse_notify_socket(OsStr::new(&long)).is_err());
    }

    #[test]
    fn watchdog_is_for_our_pid_only() {
        assert_eq!(parse_watchdog(None, None, 7), Ok(None));
        assert_eq!(
            parse_watchdog(os("500000"), None, 7),
            Ok(Some(Duration::from_millis(500)))
        );
        assert_eq!(
            parse_watchdog(os("500000"), os("7"), 7),
            Ok(Some(Duration::from_millis(500)))
        );
        assert_eq!(parse_watchdog(os("500000"), os("8"), 7), Ok(None));
        assert_eq!(
            parse_watchdog(os("0"), None, 7),
            Err(EnvError::ZeroWatchdog)
        );
        assert!(matches!(
            parse_watchdog(os("1s"), None, 7),
            Err(EnvError::NotANumber {
                var: WATCHDOG_USEC,
                ..
            })
        ));
        assert!(matches!(
            parse_watchdog(os("5"), os("me"), 7),
            Err(EnvError::NotANumber {
                var: WATCHDOG_PID,
                ..
            })
        ));
    }

    #[test]
    fn listen_variables() {
        assert_eq!(parse_listen(None, os("1"), None, 7), Ok(vec![]));
        assert_eq!(
            parse_listen(os("8"), os("1"), None, 7),
            Ok(vec![]),
            "meant for another process"
        );
        assert_eq!(
            parse_listen(os("7"), os("2"), None, 7),
            Ok(vec!["unknown".to_string(), "unknown".to_string()])
        );
        assert_eq!(
            parse_listen(os("7"), os("2"), os("recorder:extra"), 7),
            Ok(vec!["recorder".into(), "extra".into()])
        );
        assert_eq!(parse_listen(os("7"), os("0"), os(""), 7), Ok(vec![]));
        assert_eq!(
            parse_listen(os("7"), os("2"), os("recorder"), 7),
            Err(EnvError::FdNames { names: 1, fds: 2 })
        );
        assert!(matches!(
            parse_listen(os("7"), os("x"), None, 7),
            Err(EnvError::NotANumber {
                var: LISTEN_FDS,
                ..
            })
        ));
        assert!(matches!(
            parse_listen(os("7"), os("100000"), None, 7),
            Err(EnvError::TooManyFds(100000))
        ));
    }

    #[test]
    fn states_are_newline_separated_assignments() {
        let mut m = String::new();
        for s in [
            State::Ready,
            State::Status("serving\nmodel"),
            State::Watchdog,
            State::Stopping,
        ] {
            s.write(&mut m);
        }
        assert_eq!(m, "READY=1\nSTATUS=serving model\nWATCHDOG=1\nSTOPPING=1\n");
    }

    #[test]
    fn only_listening_unix_stream_sockets_are_accepted() {
        let d = tempfile::tempdir().unwrap();
        let listening = UnixListener::bind(d.path().join("l.sock")).unwrap();
        let fd = |o: OwnedFd| ListenFd {
            fd: o,
            name: "recorder".into(),
        };
        assert!(fd(OwnedFd::from(listening)).into_unix_listener().is_ok());

        let dgram = UnixDatagram::bind(d.path().join("d.sock")).unwrap();
        let e = fd(OwnedFd::from(dgram))
            .into_unix_listener()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a stream socket"), "{e}");

        let file = std::fs::File::create(d.path().join("f")).unwrap();
        let e = fd(OwnedFd::from(file))
            .into_unix_listener()
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a socket"), "{e}");

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = fd(OwnedFd::from(tcp))
            .into_unix_listener()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a Unix socket"), "{e}");

        // A bound but not listening stream socket.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = fd(OwnedFd::from(a))
            .into_unix_listener()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not listening"), "{e}");
    }

    #[test]
    fn notifications_reach_path_and_abstract_sockets() {
        let d = tempfile::tempdir().unwrap();
        let path_sock = UnixDatagram::bind(d.path().join("notify")).unwrap();
        let name = format!("reflex-systemd-test-{}", std::process::id());
        let abstract_sock =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        for (sock, value) in [
            (path_sock, d.path().join("notify").into_os_string()),
            (abstract_sock, format!("@{name}").into()),
        ] {
            let addr = parse_notify_socket(&value).unwrap();
            let s = UnixDatagram::unbound().unwrap();
            let mut msg = String::new();
            State::Ready.write(&mut msg);
            s.send_to_addr(msg.as_bytes(), &addr).unwrap();
            let mut buf = [0u8; 64];
            let n = sock.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"READY=1\n");
        }
    }

    #[test]
    fn claimed_descriptors_are_checked_and_made_close_on_exec() {
        // Far above anything this test process has open, so no test needs to own fd 3.
        let start = 900;
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(unsafe { libc::dup2(file.as_raw_fd(), start) }, start);
        assert_eq!(
            unsafe { libc::fcntl(start, libc::F_GETFD) } & libc::FD_CLOEXEC,
            0
        );

        let e = claim_fds(start, vec!["a".into(), "b".into()]).unwrap_err();
        assert!(matches!(e, EnvError::FdNotOpen { fd: 901, .. }), "{e}");
        assert!(
            unsafe { libc::fcntl(start, libc::F_GETFD) } >= 0,
            "a refused claim closes nothing"
        );

        let got = claim_fds(start, vec!["recorder".into()]).unwrap();
        assert_eq!(
            (got[0].fd.as_raw_fd(), got[0].name.as_str()),
            (start, "recorder")
        );
        assert_ne!(
            unsafe { libc::fcntl(start, libc::F_GETFD) } & libc::FD_CLOEXEC,
            0
        );
        drop(got);
        assert!(
            unsafe { libc::fcntl(start, libc::F_GETFD) } < 0,
            "owned, so closed on drop"
        );
    }
}
