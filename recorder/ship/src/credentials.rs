//! Credentials and region the way the AWS tools find them: the environment first, then the
//! shared credentials file, which must be readable by its owner only.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Keys for signing requests.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    /// Where they came from, for logs (never the keys themselves).
    pub source: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Why no credentials could be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write them to {} (mode 0600)",
        path.display()
    )]
    Missing { path: PathBuf },
    #[error("{} is readable by group or others (mode {mode:o}); chmod 600 it", path.display())]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("cannot read credentials file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} has no [{profile}] section with aws_access_key_id and aws_secret_access_key", path.display())]
    NoProfile { path: PathBuf, profile: String },
    #[error("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not (or the other way round)")]
    HalfSet,
}

/// `AWS_REGION`, else `AWS_DEFAULT_REGION`, else `us-east-1`.
pub fn region(env: &dyn Fn(&str) -> Option<String>) -> String {
    env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "us-east-1".into())
}

/// Finds credentials: the environment, then the shared credentials file.
pub fn find(env: &dyn Fn(&str) -> Option<String>) -> Result<Credentials, CredentialsError> {
    let non_empty = |k| env(k).filter(|v| !v.is_empty());
    match (
        non_empty("AWS_ACCESS_KEY_ID"),
        non_empty("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(id), Some(secret)) => {
            return Ok(Credentials {
                access_key_id: id,
                secret_access_key: secret,
                session_token: non_empty("AWS_SESSION_TOKEN"),
                source: "environment".into(),
            });
        }
        (None, None) => {}
        _ => return Err(CredentialsError::HalfSet),
    }
    let path = match non_empty("AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => PathBuf::from(p),
        None => match non_empty("HOME") {
            Some(home) => Path::new(&home).join(".aws/credentials"),
            None => {
                return Err(CredentialsError::Missing {
                    path: "~/.aws/credentials".into(),
                });
            }
        },
    };
    let profile = non_empty("AWS_PROFILE").unwrap_or_else(|| "default".into());
    from_file(&path, &profile)
}

/// Reads `[profile]` of an INI credentials file, refusing one that others may read.
pub fn from_file(path: &Path, profile: &str) -> Result<Credentials, CredentialsError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CredentialsError::Missing {
                path: path.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(CredentialsError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CredentialsError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(|source| CredentialsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let (mut id, mut secret, mut token) = (None, None, None);
    let mut in_profile = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = name.trim() == profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_string();
            match k.trim() {
                "aws_access_key_id" => id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    match (id, secret) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials {
            access_key_id,
            secret_access_key,
            session_token: token,
            source: format!("{} [{profile}]", path.display()),
        }),
        _ => Err(CredentialsError::NoProfile {
            path: path.to_path_buf(),
            profile: profile.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn environment_then_a_private_file() {
        let c = find(&env(&[
            ("AWS_ACCESS_KEY_ID", "AK"),
            ("AWS_SECRET_ACCESS_KEY", "SK"),
        ]))
        .unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.source.as_str()),
            ("AK", "environment")
        );
        assert!(
            format!("{c:?}").find("SK").is_none(),
            "the secret never prints"
        );
        assert!(matches!(
            find(&env(&[("AWS_ACCESS_KEY_ID", "AK")])),
            Err(CredentialsError::HalfSet)
        ));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("credentials");
        fs::write(
            &file,
            "[default]\naws_access_key_id = D\naws_secret_access_key = DS\n\n[ship]\naws_access_key_id=S\naws_secret_access_key=SS\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        let e = find(&env(&[("AWS_SHARED_CREDENTIALS_FILE", f)])).unwrap_err();
        assert!(
            matches!(e, CredentialsError::TooOpen { mode: 0o640, .. }),
            "{e}"
        );
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        let c = find(&env(&[("AWS_SHARED_CREDENTIALS_FILE", f)])).unwrap();
        assert_eq!(c.secret_access_key, "DS");
        let c = find(&env(&[
            ("AWS_SHARED_CREDENTIALS_FILE", f),
            ("AWS_PROFILE", "ship"),
        ]))
        .unwrap();
        assert_eq!(c.access_key_id, "S");
        assert!(matches!(
            find(&env(&[
                ("AWS_SHARED_CREDENTIALS_FILE", f),
                ("AWS_PROFILE", "x")
            ])),
            Err(CredentialsError::NoProfile { .. })
        ));
        let home = dir.path().to_str().unwrap();
        assert!(matches!(
            find(&env(&[("HOME", home)])),
            Err(CredentialsError::Missing { .. })
        ));
        assert_eq!(
            region(&env(&[("AWS_DEFAULT_REGION", "eu-west-1")])),
            "eu-west-1"
        );
        assert_eq!(region(&env(&[])), "us-east-1");
    }
}
