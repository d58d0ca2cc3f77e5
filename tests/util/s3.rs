//! A real S3-compatible server for the shipping tests (s3s-fs, installed by
//! `deploy/ci-setup.sh`), a fault-injecting TCP proxy in front of it, and a client that
//! reads the bucket back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use object_store::{ObjectStore, ObjectStoreExt};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const ACCESS_KEY: &str = "reflex-test-key";
pub const SECRET_KEY: &str = "reflex-test-secret";
pub const BUCKET: &str = "fleet";

/// `$REFLEX_S3S_FS`, else `s3s-fs` on PATH, else `~/.cargo/bin/s3s-fs`.
pub fn s3s_fs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REFLEX_S3S_FS") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("s3s-fs");
            if p.is_file() {
                return p;
            }
        }
    }
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME"));
    let p = home.join(".cargo/bin/s3s-fs");
    assert!(
        p.is_file(),
        "s3s-fs not found: run deploy/ci-setup.sh (cargo install --locked s3s-fs --version 0.14.1 --features binary) or set REFLEX_S3S_FS"
    );
    p
}

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One s3s-fs process serving `root` (one folder per bucket) on a loopback port.
pub struct S3Server {
    child: Option<Child>,
    pub root: PathBuf,
    pub port: u16,
    log: PathBuf,
}

impl S3Server {
    /// Starts a server with the bucket [`BUCKET`] on a fresh port.
    pub fn start(root: &Path) -> S3Server {
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let mut s = S3Server {
            child: None,
            root: root.to_path_buf(),
            port: free_port(),
            log: root.with_extension("log"),
        };
        s.restart();
        s
    }

    /// (Re)starts the process on the same port and root; waits until it accepts.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(s3s_fs_bin())
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--access-key",
                ACCESS_KEY,
                "--secret-key",
                SECRET_KEY,
            ])
            .arg(&self.root)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        let deadline = Instant::now() + super::TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- s3s-fs log -----\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// What the proxy does to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    /// Answers `500 Internal Server Error` to the first request and closes.
    Status500,
    /// Forwards this many bytes upstream, then resets the connection (RST).
    ResetAfter(usize),
}

/// A loopback TCP proxy to `upstream` that applies `plan[i]` to its i-th connection (and
/// [`Fault::Pass`] after the plan). Runs until the test's runtime ends.
pub struct FaultProxy {
    pub port: u16,
    pub faults_done: Arc<AtomicUsize>,
}

impl FaultProxy {
    pub async fn start(upstream: u16, plan: Vec<Fault>) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults_done = Arc::new(AtomicUsize::new(0));
        let done = faults_done.clone();
        tokio::spawn(async move {
            for i in 0.. {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let fault = plan.get(i).copied().unwrap_or(Fault::Pass);
                let done = done.clone();
                tokio::spawn(async move {
                    let _ = proxy_one(client, upstream, fault, &done).await;
                });
            }
        });
        FaultProxy { port, faults_done }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

async fn proxy_one(
    mut client: tokio::net::TcpStream,
    upstream: u16,
    fault: Fault,
    done: &AtomicUsize,
) -> std::io::Result<()> {
    match fault {
        Fault::Pass => {
            let mut up = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
            tokio::io::copy_bidirectional(&mut client, &mut up).await?;
        }
        Fault::Status500 => {
            let mut buf = [0u8; 4096];
            let _ = client.read(&mut buf).await?;
            client
                .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await?;
            done.fetch_add(1, Ordering::SeqCst);
        }
        Fault::ResetAfter(limit) => {
            let up = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
            // Linger 0: the close below sends RST instead of FIN.
            #[allow(deprecated)]
            client.set_linger(Some(Duration::ZERO))?;
            let (mut cr, mut cw) = client.into_split();
            let (mut ur, mut uw) = up.into_split();
            let back = tokio::spawn(async move { tokio::io::copy(&mut ur, &mut cw).await });
            let mut buf = vec![0u8; 16 * 1024];
            let mut sent = 0;
            loop {
                let n = cr.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                let n = n.min(limit - sent);
                uw.write_all(&buf[..n]).await?;
                sent += n;
                if sent >= limit {
                    break;
                }
            }
            back.abort();
            // The write half lives in the aborted task; wait for it to be dropped.
            let _ = back.await;
            drop(cr);
            done.fetch_add(1, Ordering::SeqCst);
        }
    }
    Ok(())
}

/// A client on the bucket for the assertions (the real object_store S3 client).
pub fn bucket(endpoint: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_region("us-east-1")
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .build()
            .unwrap(),
    )
}

/// Every object under `prefix`: key → (size, sha256).
pub async fn objects(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
) -> std::collections::BTreeMap<String, (u64, String)> {
    use futures::TryStreamExt;
    let prefix = object_store::path::Path::from(prefix);
    let metas: Vec<_> = super::timeout(store.list(Some(&prefix)).try_collect::<Vec<_>>())
        .await
        .unwrap();
    let mut out = std::collections::BTreeMap::new();
    for m in metas {
        let bytes = super::timeout(async { store.get(&m.location).await?.bytes().await })
            .await
            .unwrap();
        assert_eq!(bytes.len() as u64, m.size, "{}", m.location);
        out.insert(m.location.to_string(), (m.size, sha256_hex(&bytes)));
    }
    out
}

pub fn sha256_hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// A manifest object's one JSON line.
pub async fn manifest(store: &Arc<dyn ObjectStore>, key: &str) -> serde_json::Value {
    let bytes = super::timeout(async {
        store
            .get(&object_store::path::Path::from(key))
            .await?
            .bytes()
            .await
    })
    .await
    .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}
