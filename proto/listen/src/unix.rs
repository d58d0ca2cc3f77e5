//! A daemon's Unix socket: binding it, and the stream of connections it accepts.
//!
//! Who may connect is decided by file permissions alone (Unix listeners carry neither token
//! nor TLS): the socket is [`SOCKET_MODE`] (owner and group), a folder created for it
//! [`DIR_MODE`]. The socket exists with umask bits for an instant before its mode is set;
//! its folder is what keeps strangers out meanwhile.
//!
//! A socket file left behind by a process that died is replaced. One that a process still
//! answers on is refused: a second daemon never steals a live one's socket. A path that
//! holds anything but a socket (a file, a folder, a symlink) is refused and left as it is,
//! so a typo in `--listen` cannot delete someone's file.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};

use crate::authority::{AuthorityFix, AuthorityFixOptions};

/// Mode of a listening socket: read and write for its owner and group.
pub const SOCKET_MODE: u32 = 0o660;

/// Mode of a socket's folder when [`bind_unix`] creates it.
pub const DIR_MODE: u32 = 0o750;

/// Why a Unix socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A process accepts connections on the socket.
    #[error("{} is in use: another process is listening on it", .0.display())]
    InUse(PathBuf),
    /// The path holds something other than a socket; it is left alone.
    #[error("{} exists and is not a socket; not replacing it", .0.display())]
    NotASocket(PathBuf),
    /// A file-system call failed; `action` says which.
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds a listening Unix socket at `path` with mode [`SOCKET_MODE`]: creates its folder
/// ([`DIR_MODE`]) if missing, replaces a stale socket file, refuses a live socket and
/// anything that is not a socket. Needs a tokio runtime (the listener is registered with
/// it).
pub fn bind_unix(path: &Path) -> Result<UnixListener, BindError> {
    let fail = |action: &'static str, at: &Path| {
        let path = at.to_path_buf();
        move |source| BindError::Io {
            action,
            path,
            source,
        }
    };
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(parent)
            .map_err(fail("create the folder", parent))?;
        // Exactly DIR_MODE whatever the umask: the group needs to reach the socket.
        fs::set_permissions(parent, fs::Permissions::from_mode(DIR_MODE))
            .map_err(fail("set permissions on", parent))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(BindError::NotASocket(path.to_path_buf()));
        }
        // Connecting is how to tell a live socket from a stale one: the file stays when its
        // process dies. A Unix connect answers at once, so blocking here is brief.
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(BindError::InUse(path.to_path_buf())),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                ) =>
            {
                tracing::info!(socket = %path.display(), "stale socket removed");
                fs::remove_file(path).map_err(fail("remove the stale socket", path))?;
            }
            // Not allowed to try, for instance: not ours to replace.
            Err(e) => return Err(fail("connect to the existing socket", path)(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail("inspect", path)(e)),
    }
    let listener = UnixListener::bind(path).map_err(fail("listen on", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(fail("set permissions on", path))?;
    Ok(listener)
}

/// The connections `listener` accepts, each behind [`AuthorityFix`], for tonic's
/// `serve_with_incoming` / `serve_with_incoming_shutdown`: Python grpcio, grpc-java and
/// `grpcurl -unix` send the socket path as `:authority`, which h2 refuses.
pub fn unix_incoming(
    listener: UnixListener,
) -> impl Stream<Item = io::Result<AuthorityFix<UnixStream>>> + Send + 'static {
    UnixListenerStream::new(listener).map(|conn| conn.map(fix_authority))
}

fn fix_authority(io: UnixStream) -> AuthorityFix<UnixStream> {
    // 64 KiB of headers is far beyond any gRPC client and caps the HPACK work per request.
    AuthorityFix::with_options(
        io,
        AuthorityFixOptions {
            max_header_block: 64 * 1024,
            ..Default::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn unix_socket_is_0660_and_a_live_one_is_not_stolen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/x.sock");
        let l = bind_unix(&p).unwrap();
        assert_eq!(mode(&p), 0o660);
        let err = bind_unix(&p).unwrap_err().to_string();
        assert!(err.contains("in use"), "{err}");
        drop(l);
        // The file is left behind by the dropped listener: stale, so replaced.
        bind_unix(&p).unwrap();
    }

    #[tokio::test]
    async fn a_missing_folder_is_made_0750() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/x.sock");
        bind_unix(&p).unwrap();
        assert_eq!(mode(&d.path().join("a/b")), 0o750);
        assert_eq!(mode(&p), 0o660);
    }

    #[tokio::test]
    async fn anything_but_a_socket_is_refused_and_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("file.sock");
        fs::write(&file, b"not a socket").unwrap();
        assert!(matches!(bind_unix(&file), Err(BindError::NotASocket(_))));
        assert_eq!(fs::read(&file).unwrap(), b"not a socket");

        let folder = d.path().join("folder.sock");
        fs::create_dir(&folder).unwrap();
        assert!(matches!(bind_unix(&folder), Err(BindError::NotASocket(_))));
        assert!(folder.is_dir());

        // A symlink to a live socket is not followed: it is not ours to replace either.
        let live = d.path().join("live.sock");
        let _l = bind_unix(&live).unwrap();
        let link = d.path().join("link.sock");
        std::os::unix::fs::symlink(&live, &link).unwrap();
        let err = bind_unix(&link).unwrap_err();
        assert!(matches!(err, BindError::NotASocket(_)), "{err}");
        assert!(live.exists());
    }

    #[tokio::test]
    async fn an_unusable_path_names_the_step_that_failed() {
        let d = tempfile::tempdir().unwrap();
        let blocker = d.path().join("plain-file");
        fs::write(&blocker, b"").unwrap();
        // The socket's folder would have to be a file.
        let err = bind_unix(&blocker.join("x.sock")).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, BindError::Io { .. }), "{text}");
        assert!(
            text.starts_with("cannot inspect") && text.contains("x.sock"),
            "{text}"
        );
    }
}
