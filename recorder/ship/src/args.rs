//! The `reflex ship` flags, validated while parsing, and the destination they name.

use std::path::PathBuf;
use std::time::Duration;

/// Closed traces of one recorder directory to S3-compatible object storage.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Keys: PREFIX/robot=<ID>/date=<YYYY-MM-DD>/model=<model_hash>/<file name>, the date of the \
session's start (UTC) and the model hash from the file's header; beside each object a \
manifest line PREFIX/robot=<ID>/_manifest/<file name>.json (key, size, sha256, records, \
uploaded_at), written after the object is verified.

Only closed files are shipped: those whose footer is written (a file being recorded, or one \
a killed recorder left until its next start repairs it, waits). Each upload is verified \
(HEAD size, then the object read back and its SHA-256 compared with the local file's) before \
it is recorded in DIR/.reflex-ship.json; while that file exists the recorder's \
--max-total-mb keeps every file not shipped yet, unless the disk is nearly full.

Configuration as the AWS tools: AWS_ENDPOINT_URL (or --endpoint; http:// only when given \
explicitly), AWS_REGION / AWS_DEFAULT_REGION (default us-east-1), AWS_ACCESS_KEY_ID + \
AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN), else the [AWS_PROFILE or default] section of \
AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials, which must not be readable by group or \
others.

Exit codes: 0 done (with --once: every closed file verified in the bucket), 1 error (a bad \
destination, credentials refused, a file that failed after its retries), 64 usage error.")]
pub struct ShipArgs {
    /// The recorder's trace directory (`--dir` is accepted too).
    #[arg(
        long = "trace-dir",
        alias = "dir",
        env = "REFLEX_SHIP_DIR",
        value_name = "DIR"
    )]
    pub dir: PathBuf,
    /// Destination, s3://BUCKET or s3://BUCKET/PREFIX.
    #[arg(long, env = "REFLEX_SHIP_TO", value_name = "s3://BUCKET/PREFIX", value_parser = Destination::parse)]
    pub to: Destination,
    /// This robot's id in the keys (`robot=<ID>`): 1-64 of [A-Za-z0-9._-].
    #[arg(long, env = "REFLEX_SHIP_ROBOT", value_name = "ID", value_parser = parse_robot)]
    pub robot: String,
    /// Ship every closed file there is, then exit (0 when all are verified).
    #[arg(long)]
    pub once: bool,
    /// Delete a local file once its upload is verified.
    #[arg(long)]
    pub delete_after_upload: bool,
    /// Upload bandwidth cap in megabits per second (averaged over each part).
    #[arg(long, value_name = "N", value_parser = parse_mbps)]
    pub max_mbps: Option<f64>,
    /// S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS's own). http:// is allowed here.
    #[arg(long, env = "AWS_ENDPOINT_URL", value_name = "URL", value_parser = parse_endpoint)]
    pub endpoint: Option<String>,
    /// Seconds between scans of DIR (daemon mode).
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub interval_secs: u64,
    /// Files at least this large go up as a multipart upload of parts this size (MiB, 5-512).
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u64).range(5..=512))]
    pub part_mb: u64,
    /// Attempts per file before it is given up for this pass (`slug=ship-failed`).
    #[arg(long, value_name = "N", default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub attempts: u32,
    /// Serve Prometheus metrics (backlog, uploads, retries) at http://ADDR/metrics; loopback only.
    #[arg(long, env = "REFLEX_SHIP_METRICS_LISTEN", value_name = "ADDR", value_parser = parse_loopback)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Per-request timeout in seconds.
    #[arg(long, value_name = "N", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout_secs: u64,
}

impl ShipArgs {
    pub fn part_bytes(&self) -> usize {
        (self.part_mb as usize) << 20
    }

    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_secs)
    }

    /// Bytes per second, from `--max-mbps`.
    pub fn max_bytes_per_sec(&self) -> Option<f64> {
        self.max_mbps.map(|m| m * 1e6 / 8.0)
    }
}

/// `s3://BUCKET[/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub bucket: String,
    /// No leading or trailing slash; may be empty.
    pub prefix: String,
}

impl Destination {
    pub fn parse(s: &str) -> Result<Destination, String> {
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{s:?} is not an s3://BUCKET/PREFIX URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(format!(
                "bucket {bucket:?} is not 3-63 characters of [a-z0-9.-]"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..")
            || prefix.contains("//")
            || prefix.chars().any(char::is_control)
        {
            return Err(format!("prefix {prefix:?} has an empty, . or .. segment"));
        }
        Ok(Destination {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// `PREFIX/robot=ID`, the root of one robot's keys.
    pub fn robot_root(&self, robot: &str) -> String {
        if self.prefix.is_empty() {
            format!("robot={robot}")
        } else {
            format!("{}/robot={robot}", self.prefix)
        }
    }
}

/// A robot id: 1-64 characters of [A-Za-z0-9._-] (it becomes a key segment `robot=<ID>`).
pub fn parse_robot(s: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && s != "."
        && s != "..";
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "robot id {s:?} is not 1-64 characters of [A-Za-z0-9._-]"
        ))
    }
}

fn parse_mbps(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a positive number of megabits per second"
        )),
    }
}

fn parse_loopback(s: &str) -> Result<std::net::SocketAddr, String> {
    match s.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_loopback() => Ok(a),
        Ok(a) => Err(format!(
            "{a} is not a loopback address (the metrics stay on the robot)"
        )),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

/// An S3 endpoint URL: http:// or https://, without a trailing slash.
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    if s.starts_with("http://") || s.starts_with("https://") {
        Ok(s.trim_end_matches('/').to_string())
    } else {
        Err(format!("endpoint {s:?} is not an http:// or https:// URL"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_and_robot_ids_are_checked() {
        assert_eq!(
            Destination::parse("s3://fleet-traces/a/b/").unwrap(),
            Destination {
                bucket: "fleet-traces".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(Destination::parse("s3://bkt").unwrap().prefix, "");
        for bad in [
            "fleet/a",
            "gs://bkt/a",
            "s3://B/x",
            "s3://bkt/a/../b",
            "s3://bkt/a//b",
            "s3://",
        ] {
            assert!(Destination::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Destination::parse("s3://bkt/p").unwrap().robot_root("r1"),
            "p/robot=r1"
        );
        assert!(parse_robot("arm-07.lab_2").is_ok());
        for bad in ["", "a/b", "..", "robot=1", &"x".repeat(65)] {
            assert!(parse_robot(bad).is_err(), "{bad}");
        }
        assert!(parse_mbps("0").is_err() && parse_mbps("2.5").is_ok());
        assert!(parse_endpoint("ftp://x").is_err());
        assert!(parse_loopback("127.0.0.1:0").is_ok() && parse_loopback("0.0.0.0:9464").is_err());
    }
}
