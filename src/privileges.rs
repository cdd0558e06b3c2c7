//! `agent.user` / `agent.group`: start as root, open what needs root, hand the agent's own
//! files to the user, then drop to it for good (before any worker thread exists).

use std::ffi::{CStr, CString};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A resolved account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
}

/// Resolves `user` (and `group`, default: the user's primary group).
pub fn resolve(user: &str, group: Option<&str>) -> Result<Account, String> {
    let cuser = CString::new(user).map_err(|_| format!("agent.user {user:?} is not a valid name"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain data; getpwnam_r fills it with pointers into `buf`.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe { libc::getpwnam_r(cuser.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(format!("agent.user {user:?} does not exist on this host"));
    }
    let mut account = Account { uid: pw.pw_uid, gid: pw.pw_gid };
    if let Some(g) = group {
        let cgroup = CString::new(g).map_err(|_| format!("agent.group {g:?} is not a valid name"))?;
        // SAFETY: as above, for group.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut gout: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe { libc::getgrnam_r(cgroup.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut gout) };
        if rc != 0 || gout.is_null() {
            return Err(format!("agent.group {g:?} does not exist on this host"));
        }
        account.gid = gr.gr_gid;
    }
    Ok(account)
}

fn chown(path: &Path, a: Account) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(a.uid), Some(a.gid))
}

/// Gives `path` (recursively, for directories) to the account.
pub fn hand_over(path: &Path, a: Account) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.uid() != a.uid || meta.gid() != a.gid {
        chown(path, a)?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            hand_over(&entry?.path(), a)?;
        }
    }
    Ok(())
}

/// Drops to the account for good. Already running as it: nothing to do.
pub fn drop_to(a: Account) -> Result<(), String> {
    // SAFETY: plain syscalls; glibc applies setgid/setuid to every thread of the process.
    unsafe {
        if libc::geteuid() == a.uid && libc::getegid() == a.gid {
            return Ok(());
        }
        if libc::geteuid() != 0 {
            return Err(format!("agent.user needs the agent to start as root (it runs as uid {})", libc::geteuid()));
        }
        if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(a.gid) != 0 || libc::setuid(a.uid) != 0 {
            return Err(format!("cannot switch to uid {} gid {}: {}", a.uid, a.gid, std::io::Error::last_os_error()));
        }
        // Root must be gone for good: a process that can get it back has not dropped it.
        if libc::setuid(0) == 0 {
            return Err("privileges were not dropped (setuid(0) still succeeds)".into());
        }
    }
    Ok(())
}

/// The name of the user the process runs as (for log lines).
pub fn current_user() -> String {
    // SAFETY: getpwuid returns a pointer to static storage or null; read at once.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if pw.is_null() {
            return format!("uid {}", libc::geteuid());
        }
        CStr::from_ptr((*pw).pw_name).to_string_lossy().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_root_and_refuses_unknown_accounts() {
        assert_eq!(resolve("root", None).unwrap(), Account { uid: 0, gid: 0 });
        assert!(resolve("no-such-user-wazuh", None).unwrap_err().contains("does not exist"));
        assert!(resolve("root", Some("no-such-group-wazuh")).unwrap_err().contains("agent.group"));
    }
}
