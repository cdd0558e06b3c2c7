//! `<run_dir>/wazuh-agent.pid`: the running agent's pid, locked (advisory) for the process's life:
//! a second agent refuses to start, and a stale file left by a crash (unlocked) is taken over.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why the pid file could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum PidError {
    /// Another agent holds the lock.
    #[error("another agent is already running ({}{})", pid.map(|p| format!("pid {p}, ")).unwrap_or_default(), path.display())]
    Running { path: PathBuf, pid: Option<u32> },
    /// The file could not be opened, locked or written.
    #[error("pid file {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// The held pid file; removed when dropped (clean stop).
pub struct PidFile {
    path: PathBuf,
    // Keeps the lock: closing the descriptor releases it.
    _file: File,
}

impl PidFile {
    pub fn acquire(run_dir: &Path, user: Option<&str>) -> Result<PidFile, PidError> {
        let path = run_dir.join("wazuh-agent.pid");
        let io = |source| PidError::Io { path: path.clone(), source };
        crate::fsutil::open_path(run_dir, true).map_err(io)?;
        // Not truncated on open: a running agent's pid must stay readable if we lose the race (or the file is refused).
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false).mode(0o644);
        let file = crate::fsutil::open_owned(&mut opts, &path, user).map_err(io)?;
        if let Err(err) = crate::sys::try_lock_exclusive(&file) {
            if err.kind() == io::ErrorKind::WouldBlock {
                let pid = io::read_to_string(&file).ok().and_then(|t| t.trim().parse().ok());
                return Err(PidError::Running { path, pid });
            }
            return Err(io(err));
        }
        file.set_len(0).map_err(io)?;
        file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0).map_err(io)?;
        Ok(PidFile { path, _file: file })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_and_stale_files_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wazuh-agent.pid");
        std::fs::write(&path, "999999\n").unwrap();
        let first = PidFile::acquire(dir.path(), None).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{}\n", std::process::id()));
        match PidFile::acquire(dir.path(), None) {
            Err(PidError::Running { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("acquired twice"),
        }
        drop(first);
        assert!(!path.exists(), "removed on a clean stop");
        PidFile::acquire(dir.path(), None).unwrap();
    }
}
