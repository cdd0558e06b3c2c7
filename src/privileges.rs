//! `agent.user` / `agent.group`: start as root, open what needs root, hand the agent's own
//! files to the user, then drop to it for good (before any worker thread exists).

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::{fsutil, sys};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
}

/// Why `agent.user`/`agent.group` could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegesError {
    /// No such account on this host (`key`: `agent.user` or `agent.group`).
    #[error("{key} {name:?} does not exist on this host")]
    Unknown { key: &'static str, name: String },
    #[error("cannot look up {key} {name:?}: {source}")]
    Lookup { key: &'static str, name: String, source: io::Error },
    #[error("cannot hand {} to agent.user (uid {uid}): {source}", path.display())]
    HandOver { path: PathBuf, uid: u32, source: io::Error },
    /// Switching accounts needs root, and the agent runs as another user.
    #[error("agent.user needs the agent to start as root (it runs as uid {uid})")]
    NotRoot { uid: u32 },
    /// setgroups, setgid or setuid failed.
    #[error("cannot switch to uid {} gid {}: {source}", account.uid, account.gid)]
    Switch { account: Account, source: io::Error },
    #[error("privileges were not dropped (setuid(0) still succeeds)")]
    NotDropped,
}

/// Resolves `user` (and `group`, default: the user's primary group).
pub fn resolve(user: &str, group: Option<&str>) -> Result<Account, PrivilegesError> {
    let (uid, gid) = lookup("agent.user", user, sys::user_by_name)?;
    let gid = group.map(|g| lookup("agent.group", g, sys::group_by_name)).transpose()?.unwrap_or(gid);
    Ok(Account { uid, gid })
}

/// Looks `name` up with `find`; errors name the configuration key.
fn lookup<T>(key: &'static str, name: &str, find: fn(&str) -> io::Result<Option<T>>) -> Result<T, PrivilegesError> {
    match find(name) {
        Ok(Some(found)) => Ok(found),
        Ok(None) => Err(PrivilegesError::Unknown { key, name: name.into() }),
        Err(source) => Err(PrivilegesError::Lookup { key, name: name.into(), source }),
    }
}

/// Gives `path` (recursively) to the account, reached as [`fsutil::open_path`] does, each entry through its directory's
/// handle and chowned through its own (O_NOFOLLOW: never a link's target). Left, with a warning: other accounts' files,
/// and root's with another link (the agent makes none: the account may have linked a root file from elsewhere).
pub fn hand_over(path: &Path, a: Account) -> Result<(), PrivilegesError> {
    fn give(node: &File, path: &Path, a: Account) -> io::Result<()> {
        let m = node.metadata()?;
        if m.uid() != a.uid && (m.uid() != 0 || !m.is_dir() && m.nlink() > 1) {
            log::warn!("{} is not handed to agent.user: owner uid {}, {} links", path.display(), m.uid(), m.nlink());
            return Ok(());
        }
        std::os::unix::fs::chown(fsutil::fd_path(node), Some(a.uid), Some(a.gid))?;
        for entry in m.is_dir().then(|| std::fs::read_dir(fsutil::fd_path(node))).transpose()?.into_iter().flatten() {
            let entry = entry?;
            give(&fsutil::handle(&entry.path())?, &path.join(entry.file_name()), a)?;
        }
        Ok(())
    }
    let given = fsutil::open_path(path, false).and_then(|top| give(&top, path, a));
    given.map_err(|source| PrivilegesError::HandOver { path: path.to_path_buf(), uid: a.uid, source })
}

/// Drops to the account for good. Already running as it: nothing to do.
pub fn drop_to(a: Account) -> Result<(), PrivilegesError> {
    let (uid, gid) = sys::effective_ids();
    if (uid, gid) == (a.uid, a.gid) {
        return Ok(());
    }
    if uid != 0 {
        return Err(PrivilegesError::NotRoot { uid });
    }
    sys::switch_to(a.uid, a.gid).map_err(|source| PrivilegesError::Switch { account: a, source })?;
    // Root must be gone for good: a process that can get it back has not dropped it.
    if sys::can_regain_root() { Err(PrivilegesError::NotDropped) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_root_and_refuses_unknown_accounts() {
        assert_eq!(resolve("root", None).unwrap(), Account { uid: 0, gid: 0 });
        assert!(resolve("no-such-user-wazuh", None).unwrap_err().to_string().contains("does not exist"));
        assert!(resolve("root", Some("no-such-group-wazuh")).unwrap_err().to_string().contains("agent.group"));
    }

    #[test]
    fn hand_over_names_the_path_and_keeps_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = hand_over(&missing, Account { uid: 0, gid: 0 }).unwrap_err();
        assert!(err.to_string().starts_with(&format!("cannot hand {} to agent.user (uid 0): ", missing.display())));
        let source = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<io::Error>());
        assert_eq!(source.map(io::Error::kind), Some(io::ErrorKind::NotFound));
    }

    #[test]
    fn hand_over_changes_links_never_their_targets_and_refuses_a_link_as_the_path() {
        use std::os::unix::fs::{MetadataExt, symlink};
        let nobody = resolve("nobody", None).unwrap();
        let (outside, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (victim, victim_dir) = (outside.path().join("victim"), outside.path().join("victim-dir"));
        std::fs::write(&victim, "root's").unwrap();
        std::fs::create_dir(&victim_dir).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/file"), "").unwrap();
        symlink(&victim, dir.path().join("sub/link")).unwrap();
        symlink(&victim_dir, dir.path().join("dir-link")).unwrap();
        hand_over(dir.path(), nobody).unwrap();
        let uid = |p: &Path| std::fs::symlink_metadata(p).unwrap().uid();
        assert_eq!(uid(&dir.path().join("sub/file")), nobody.uid);
        assert_eq!(uid(&dir.path().join("sub/link")), nobody.uid, "the link itself");
        assert_eq!((uid(&victim), uid(&victim_dir)), (0, 0), "root's files stay root's");
        // dir now belongs to nobody: a link there, even as the top path, is refused.
        let err = hand_over(&dir.path().join("dir-link"), nobody).unwrap_err().to_string();
        assert!(
            err.contains("dir-link passes through a symbolic link in a directory another account can write"),
            "{err}"
        );
        assert_eq!(uid(&victim_dir), 0);
        // A hard link to a file of root's elsewhere is left to root; the account's own and root's single ones are given.
        std::fs::hard_link(&victim, dir.path().join("sub/hard")).unwrap();
        std::fs::write(dir.path().join("sub/new"), "").unwrap();
        hand_over(dir.path(), nobody).unwrap();
        assert_eq!((uid(&victim), uid(&dir.path().join("sub/new"))), (0, nobody.uid));
    }
}
