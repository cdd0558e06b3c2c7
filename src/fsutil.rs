//! Small filesystem helpers with the durability rules every file of the agent follows.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Creates `dir` (and parents) if needed and sets it to mode 0700: it holds secrets.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Opens `path` without following a symbolic link in its last component (root opens files in directories agent.user
/// can write, where it may plant one); O_NONBLOCK: a FIFO planted there must not hang root in `open`.
pub fn open_nofollow(opts: &mut OpenOptions, path: &Path) -> io::Result<File> {
    open_at(opts, path, path)
}

fn open_at(opts: &mut OpenOptions, at: &Path, path: &Path) -> io::Result<File> {
    opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(at).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => io::Error::other(format!("{} is a symbolic link; refusing to follow it", path.display())),
        _ => e,
    })
}

/// As [`open_nofollow`] (of `at`, a name beneath a handle, shown as `path`); then refuses all but a regular file with
/// one link (another may be root's file elsewhere).
pub fn open_single(opts: &mut OpenOptions, at: &Path, path: &Path) -> io::Result<File> {
    let (file, why) = (open_at(opts, at, path)?, "is not a regular file with one link; refusing it");
    let m = file.metadata()?;
    (m.is_file() && m.nlink() == 1).then_some(file).ok_or_else(|| io::Error::other(format!("{} {why}", path.display())))
}

/// As [`open_nofollow`], its directory reached as [`open_path`] does; then refuses what root must not write or hand
/// over: all but a regular file with one link (another may be root's file elsewhere) of root's, ours or `user`'s.
pub fn open_owned(opts: &mut OpenOptions, path: &Path, user: Option<&str>) -> io::Result<File> {
    let dir = open_path(path.parent().unwrap_or(path), false)?;
    let file = open_at(opts, &fd_path(&dir).join(path.file_name().unwrap_or_default()), path)?;
    let (m, euid) = (file.metadata()?, crate::sys::effective_ids().0);
    let user = user.and_then(|u| crate::sys::user_by_name(u).ok().flatten()).map(|(uid, _)| uid);
    let ok = m.is_file() && m.nlink() == 1 && [Some(0), Some(euid), user].contains(&Some(m.uid()));
    let why = "is not a regular file with one link of root's or agent.user's; refusing it";
    ok.then_some(file).ok_or_else(|| io::Error::other(format!("{} {why}", path.display())))
}

/// A handle (O_PATH) on `path` walked one component at a time, each beneath the last: a symbolic link is followed, its
/// target walked alike, only in a directory no account but root (or ours) can write. `create`: missing ones are made.
pub fn open_path(path: &Path, create: bool) -> io::Result<File> {
    let parts = |p: &Path| p.components().rev().map(|c| c.as_os_str().to_owned()).collect::<Vec<_>>();
    let (mut todo, mut node, mut links) = (parts(path), handle(Path::new("."))?, 0);
    while let Some(name) = todo.pop() {
        let at = fd_path(&node).join(name);
        let _ = create && fs::create_dir(&at).is_ok();
        let (next, dir) = (handle(&at)?, node.metadata()?);
        if !next.metadata()?.is_symlink() {
            node = next;
        } else if links < 40 && [0, crate::sys::effective_ids().0].contains(&dir.uid()) && dir.mode() & 0o022 == 0 {
            links += 1;
            todo.extend(parts(&fs::read_link(&at)?));
        } else {
            let why = "passes through a symbolic link in a directory another account can write; refusing to follow it";
            return Err(io::Error::other(format!("{} {why}", path.display())));
        }
    }
    Ok(node)
}

/// A handle (O_PATH) on the node at `at` itself, a link included, never what a link points to.
pub fn handle(at: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_NOFOLLOW).open(at)
}

/// `/proc/self/fd/<fd>`: names exactly what `file` is a handle on; what lies beneath is reached from it, as by openat.
pub fn fd_path(file: &File) -> PathBuf {
    format!("/proc/self/fd/{}", file.as_raw_fd()).into()
}

/// chmod of the node at `path` itself (a link's own mode is unused), never of what a link there points to.
pub fn chmod_nofollow(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(fd_path(&handle(path)?), fs::Permissions::from_mode(mode))
}

/// Reads `path` as [`open_nofollow`] opens it; over 16 MiB (more than any file of ours; a huge sparse file, or a FIFO
/// fed without end, planted by agent.user must not exhaust root's memory) is refused.
pub fn read_nofollow(path: &Path) -> io::Result<Vec<u8>> {
    read_at(path, path)
}

/// As [`read_nofollow`], of `at` (a name beneath a handle) shown as `path`.
pub fn read_at(at: &Path, path: &Path) -> io::Result<Vec<u8>> {
    let (mut bytes, max) = (Vec::new(), 16 << 20);
    open_at(OpenOptions::new().read(true), at, path)?.take(max + 1).read_to_end(&mut bytes)?;
    let why = format!("{} is over {max} bytes; refusing it", path.display());
    (bytes.len() as u64 <= max).then_some(bytes).ok_or_else(|| io::Error::other(why))
}

/// Replaces `path` with `bytes` atomically: a reader (or a crash) sees either the old
/// content or the new one, never a mix. The new file has `mode` from its first byte on.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = temp_path(path);
    (|| {
        // A fresh file (O_EXCL): a stale temp file, or a link planted at its name, is removed, not followed.
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        // fchmod: the umask must not narrow `mode`.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        // fsync before rename: otherwise a power loss can leave the new name on empty data.
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // fsync the directory: the rename itself is only durable once the directory is.
        File::open(dir)?.sync_all()
    })()
    .inspect_err(|_| _ = fs::remove_file(&tmp))
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // The pid keeps two processes (a --register racing a running agent) off each other's file.
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_with_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left behind");
    }

    #[test]
    fn a_failure_before_rename_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("credentials.json");
        write_atomic(&p, b"old", 0o600).unwrap();
        // A directory at the temp name (not removable as a file) makes the write fail before the rename.
        fs::create_dir_all(temp_path(&p).join("x")).unwrap();
        assert!(write_atomic(&p, b"new", 0o600).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
    }

    #[test]
    fn stale_temp_file_from_a_real_crash_is_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        write_atomic(&p, b"old", 0o600).unwrap();
        fs::write(temp_path(&p), b"half-writ").unwrap();
        fs::set_permissions(temp_path(&p), fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"old");
        write_atomic(&p, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn private_dir_is_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("data");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&d).unwrap();
        assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn open_path_follows_links_only_where_root_alone_can_write_and_open_owned_takes_only_single_link_files() {
        use std::os::unix::fs::{MetadataExt, symlink};
        let nobody = crate::privileges::resolve("nobody", None).unwrap();
        let (root, theirs, elsewhere) =
            (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        fs::write(elsewhere.path().join("f"), b"root's").unwrap();
        // A link in root's own directory is root's: followed.
        symlink(elsewhere.path(), root.path().join("link")).unwrap();
        assert!(open_path(&root.path().join("link"), false).unwrap().metadata().unwrap().is_dir());
        // The same link in a directory another account owns (or anyone can write) is refused, wherever it is.
        symlink(elsewhere.path(), theirs.path().join("link")).unwrap();
        std::os::unix::fs::chown(theirs.path(), Some(nobody.uid), None).unwrap();
        // A followed link's target is walked alike: root's link to their directory, then their link.
        symlink(theirs.path(), root.path().join("to-theirs")).unwrap();
        for path in [theirs.path().join("link"), theirs.path().join("link/f"), root.path().join("to-theirs/link/f")] {
            let err = open_path(&path, false).unwrap_err().to_string();
            assert!(
                err.ends_with(
                    "passes through a symbolic link in a directory another account can write; refusing to follow it"
                ),
                "{err}"
            );
        }
        // A loop of links, even root's, ends.
        symlink("loop", root.path().join("loop")).unwrap();
        assert!(open_path(&root.path().join("loop"), false).is_err());
        let opts = || OpenOptions::new().append(true).create(true).clone();
        assert!(open_owned(&mut opts(), &theirs.path().join("link/f"), None).is_err());
        // Made when missing, through what may be followed.
        open_path(&root.path().join("link/a/b"), true).unwrap();
        assert!(elsewhere.path().join("a/b").is_dir());
        // Files: regular, one link, root's, ours or agent.user's.
        let file = theirs.path().join("file");
        open_owned(&mut opts(), &file, None).unwrap();
        std::os::unix::fs::chown(&file, Some(nobody.uid), None).unwrap();
        assert!(open_owned(&mut opts(), &file, None).is_err(), "another account's");
        open_owned(&mut opts(), &file, Some("nobody")).unwrap();
        fs::hard_link(elsewhere.path().join("f"), theirs.path().join("hard")).unwrap();
        let err = open_owned(&mut opts(), &theirs.path().join("hard"), Some("nobody")).unwrap_err().to_string();
        assert!(
            err.ends_with("hard is not a regular file with one link of root's or agent.user's; refusing it"),
            "{err}"
        );
        assert!(open_owned(&mut opts(), theirs.path(), None).is_err(), "a directory");
        assert_eq!(fs::read(elsewhere.path().join("f")).unwrap(), b"root's");
        assert_eq!(fs::metadata(elsewhere.path().join("f")).unwrap().uid(), 0);
    }

    #[test]
    fn nofollow_helpers_never_reach_a_links_target() {
        let dir = tempfile::tempdir().unwrap();
        let (victim, link) = (dir.path().join("victim"), dir.path().join("link"));
        fs::write(&victim, b"root's").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let _ = chmod_nofollow(&link, 0o666);
        assert_eq!(fs::metadata(&victim).unwrap().permissions().mode() & 0o777, 0o644);
        let err = open_nofollow(OpenOptions::new().write(true).truncate(true), &link).unwrap_err();
        assert_eq!(err.to_string(), format!("{} is a symbolic link; refusing to follow it", link.display()));
        assert!(read_nofollow(&link).is_err());
        std::os::unix::fs::symlink(&victim, temp_path(&link)).unwrap();
        write_atomic(&link, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"root's", "the link and its temp name are replaced, not followed");
        chmod_nofollow(&victim, 0o600).unwrap();
        assert_eq!(fs::metadata(&victim).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
