//! Creating outputs. An existing output is refused unless `--force`; a file is written
//! under a temporary name beside it (`.NAME.partial`) and renamed into place when complete,
//! so an interrupted export never leaves a half file under the name asked for (and a
//! `--force` that fails leaves the old output as it was).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::TraceToolError;

/// A file being written: `finish` renames it into place; dropping it unfinished removes it.
pub struct PendingFile {
    pub tmp: PathBuf,
    pub dest: PathBuf,
    done: bool,
}

impl PendingFile {
    /// Checks `dest` (exists → refused unless `force`) and creates the temporary file.
    pub fn create(
        dest: &Path,
        force: bool,
    ) -> Result<(PendingFile, BufWriter<File>), TraceToolError> {
        if dest.symlink_metadata().is_ok() && !force {
            return Err(TraceToolError::OutputExists { path: dest.into() });
        }
        if dest.is_dir() {
            return Err(TraceToolError::Write {
                path: dest.into(),
                source: std::io::Error::other("is a directory"),
            });
        }
        let name = dest
            .file_name()
            .ok_or_else(|| TraceToolError::Write {
                path: dest.into(),
                source: std::io::Error::other("no file name"),
            })?
            .to_string_lossy();
        let tmp = dest.with_file_name(format!(".{name}.partial"));
        let file = File::create(&tmp).map_err(|source| TraceToolError::Write {
            path: dest.into(),
            source,
        })?;
        Ok((
            PendingFile {
                tmp,
                dest: dest.into(),
                done: false,
            },
            BufWriter::with_capacity(1 << 20, file),
        ))
    }

    /// Renames the finished file into place.
    pub fn finish(mut self) -> Result<(), TraceToolError> {
        std::fs::rename(&self.tmp, &self.dest).map_err(|source| TraceToolError::Write {
            path: self.dest.clone(),
            source,
        })?;
        self.done = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: the export already failed with its own error.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Wraps an I/O error about `path`.
pub fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> TraceToolError + '_ {
    move |source| TraceToolError::Write {
        path: path.into(),
        source,
    }
}
