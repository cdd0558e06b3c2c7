//! Every call the agent makes into the C library, behind small safe functions with typed results: the only
//! module allowed `unsafe` (each block says why it is sound). Policy (what to do with a result) is the callers'.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

/// A call that returns 0 on success and sets errno otherwise.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// An exclusive flock(2) on `file`, not waiting (`WouldBlock`: held elsewhere), held until all its descriptors close.
pub fn try_lock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor that `file` keeps open; LOCK_NB never blocks.
    check(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) })
}

/// Whether a process with this pid exists (kill with signal 0); 0 and pids over `i32::MAX` name process groups.
pub fn process_exists(pid: u32) -> bool {
    let Some(pid) = libc::pid_t::try_from(pid).ok().filter(|p| *p > 0) else { return false };
    // SAFETY: signal 0 sends nothing; kill only checks the pid.
    let rc = unsafe { libc::kill(pid, 0) };
    // EPERM: it exists but belongs to another user (e.g. --status run as non-root).
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Sets the calling thread's nice value (on Linux, setpriority takes a thread id).
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions; setpriority changes only our own thread.
    check(unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::syscall(libc::SYS_gettid) as libc::id_t, nice) })
}

/// The CPU time the calling thread has used (zero if the clock cannot be read).
pub fn thread_cpu_time() -> std::time::Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: one timespec that outlives the call.
    let _ = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    std::time::Duration::new(t.tv_sec.max(0) as u64, t.tv_nsec.clamp(0, 999_999_999) as u32)
}

/// Clock ticks per second, the unit of the times in `/proc/<pid>/stat`; at least 1.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64
}

/// glibc's mallopt: at most `arena_max` arenas, blocks of `mmap_threshold` bytes or more mmap'd. No-op elsewhere.
pub fn tune_malloc(arena_max: i32, mmap_threshold: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning, under the allocator's own lock.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arena_max);
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap_threshold);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (arena_max, mmap_threshold);
}

/// Returns free heap pages of every glibc arena to the system. No-op on other C libraries.
pub fn malloc_trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Connects to the system log as `wazuh-agent` (daemon facility, pid on every line) at once.
pub fn open_syslog() {
    // SAFETY: the identity is a static C string, as openlog requires (it keeps the pointer).
    unsafe { libc::openlog(c"wazuh-agent".as_ptr(), libc::LOG_PID | libc::LOG_NDELAY, libc::LOG_DAEMON) };
}

/// Sends one line to the system log; NUL bytes, which a C string cannot hold, become spaces.
pub fn syslog(level: log::Level, text: &str) {
    let priority = match level {
        log::Level::Error => libc::LOG_ERR,
        log::Level::Warn => libc::LOG_WARNING,
        log::Level::Info => libc::LOG_INFO,
        log::Level::Debug | log::Level::Trace => libc::LOG_DEBUG,
    };
    let Ok(msg) = CString::new(text.replace('\0', " ")) else { return };
    // SAFETY: a constant "%s" format with one NUL-terminated argument.
    unsafe { libc::syslog(priority, c"%s".as_ptr(), msg.as_ptr()) };
}

/// Blocks (or unblocks) SIGTERM, SIGINT and SIGHUP in this thread (threads it starts and images it execs inherit
/// the mask; a blocked signal stays pending, across exec too); returns whether a SIGTERM or SIGINT is pending.
pub fn block_signals(block: bool) -> bool {
    // SAFETY: plain C sets, initialised by sigemptyset or sigpending; the mask is this thread's.
    unsafe {
        let (mut set, mut p): (libc::sigset_t, libc::sigset_t) = (std::mem::zeroed(), std::mem::zeroed());
        libc::sigemptyset(&mut set);
        let _ = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP].map(|sig| libc::sigaddset(&mut set, sig));
        libc::pthread_sigmask(if block { libc::SIG_BLOCK } else { libc::SIG_UNBLOCK }, &set, std::ptr::null_mut());
        libc::sigpending(&mut p) == 0 && [libc::SIGTERM, libc::SIGINT].iter().any(|s| libc::sigismember(&p, *s) == 1)
    }
}

/// The uid and primary gid of the user `name`; `None` if there is none (nor for a NUL byte).
pub fn user_by_name(name: &str) -> io::Result<Option<(u32, u32)>> {
    let Ok(name) = CString::new(name) else { return Ok(None) };
    let mut buf = vec![0 as libc::c_char; LOOKUP_BUF];
    // SAFETY: passwd is plain C data (integers and pointers), for which all zeros is valid.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out = std::ptr::null_mut();
    // SAFETY: getpwnam_r fills `pw` with pointers into `buf`; all four outlive the call.
    let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    Ok(found(rc, out.is_null())?.then_some((pw.pw_uid, pw.pw_gid)))
}

/// The gid of the group called `name`; `None` if there is none.
pub fn group_by_name(name: &str) -> io::Result<Option<u32>> {
    let Ok(name) = CString::new(name) else { return Ok(None) };
    let mut buf = vec![0 as libc::c_char; LOOKUP_BUF];
    // SAFETY: group is plain C data (integers and pointers), for which all zeros is valid.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut out = std::ptr::null_mut();
    // SAFETY: getgrnam_r fills `gr` with pointers into `buf`; all four outlive the call.
    let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut out) };
    Ok(found(rc, out.is_null())?.then_some(gr.gr_gid))
}

/// The name of user `id`, or of group `id` when `group`, as NSS knows it; `None` if there is none or it is not UTF-8.
pub fn name_of(id: u32, group: bool) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; LOOKUP_BUF];
    // SAFETY: passwd and group are plain C data, for which all zeros is valid; getpwuid_r/getgrgid_r fill them with
    // pointers into `buf`, and the name is copied out while `buf` lives.
    unsafe {
        let (mut pw, mut gr): (libc::passwd, libc::group) = (std::mem::zeroed(), std::mem::zeroed());
        let (mut pw_out, mut gr_out) = (std::ptr::null_mut(), std::ptr::null_mut());
        let name = match group {
            false => libc::getpwuid_r(id, &mut pw, buf.as_mut_ptr(), buf.len(), &mut pw_out) == 0 && !pw_out.is_null(),
            true => libc::getgrgid_r(id, &mut gr, buf.as_mut_ptr(), buf.len(), &mut gr_out) == 0 && !gr_out.is_null(),
        }
        .then_some(if group { gr.gr_name } else { pw.pw_name })?;
        std::ffi::CStr::from_ptr(name).to_str().ok().map(str::to_string)
    }
}

/// Room for one user or group entry with its strings; 16 KiB holds any sane one.
const LOOKUP_BUF: usize = 16 * 1024;

/// A reentrant lookup's outcome: found, not found (0 without a result, or a POSIX "no such entry" code), or the error.
fn found(rc: libc::c_int, no_result: bool) -> io::Result<bool> {
    match rc {
        0 => Ok(!no_result),
        libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM if no_result => Ok(false),
        _ => Err(io::Error::from_raw_os_error(rc)),
    }
}

pub fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid and getegid always succeed and have no preconditions.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Becomes `uid`/`gid`: leaves the supplementary groups, sets the group, then the user (once not
/// root, it cannot change groups). glibc and musl apply each change to every thread.
pub fn switch_to(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscalls; setgroups gets an empty list (null with length 0).
    unsafe {
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setgid(gid))?;
        check(libc::setuid(uid))
    }
}

/// Whether the process can make itself root again: it tries setuid(0).
pub fn can_regain_root() -> bool {
    // SAFETY: a plain syscall on an integer.
    unsafe { libc::setuid(0) == 0 }
}

/// A new inotify(7) instance, non-blocking (reads end with `WouldBlock`) and closed on exec.
pub fn inotify() -> io::Result<File> {
    // SAFETY: no pointers; the descriptor returned is new and ours alone, so File may own it.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 { Err(io::Error::last_os_error()) } else { Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }) }
}

/// Adds (or updates) the inotify watch of `path` for `mask` on instance `fd`: the watch descriptor.
pub fn add_watch(fd: &File, path: &std::path::Path, mask: u32) -> io::Result<i32> {
    let path = CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))?;
    // SAFETY: a NUL-terminated path that outlives the call.
    let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) };
    if wd < 0 { Err(io::Error::last_os_error()) } else { Ok(wd) }
}

/// Removes watch `wd` from instance `fd` (the kernel then reports IN_IGNORED for it).
pub fn rm_watch(fd: &File, wd: i32) {
    // SAFETY: plain integers; a stale wd only fails with EINVAL.
    unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), wd) };
}

/// Waits until `fd` is readable or `timeout` passes (EINTR ends the wait early): whether it is.
pub fn wait_readable(fd: &File, timeout: std::time::Duration) -> bool {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd that outlives the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(i32::MAX as u128) as i32) > 0 }
}

/// uname(2)'s fields (empty ones by default).
#[derive(Debug, Default)]
pub struct Uname {
    pub sysname: String,
    pub nodename: String,
    pub release: String,
    pub machine: String,
}

pub fn uname() -> io::Result<Uname> {
    // SAFETY: utsname is plain C data (char arrays), for which all zeros is valid.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the struct we own.
    check(unsafe { libc::uname(&mut u) })?;
    // SAFETY: on success each field is NUL-terminated within its array.
    let f = |f: &[libc::c_char]| unsafe { CStr::from_ptr(f.as_ptr()) }.to_string_lossy().into_owned();
    Ok(Uname { sysname: f(&u.sysname), nodename: f(&u.nodename), release: f(&u.release), machine: f(&u.machine) })
}

/// One IPv4 or IPv6 address of a network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    pub name: String,
    /// IFF_UP: the interface is administratively up.
    pub up: bool,
    pub addr: IpAddr,
    pub netmask: Option<IpAddr>,
    /// The IPv4 broadcast address, on interfaces that have one.
    pub broadcast: Option<IpAddr>,
}

/// Every IPv4 and IPv6 address of the host's interfaces (getifaddrs(3)), in the kernel's order: the one walker.
pub fn interfaces() -> io::Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list that we walk read-only and free exactly once below.
    check(unsafe { libc::getifaddrs(&mut head) })?;
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list returned by getifaddrs, not yet freed. The blocks below read its name, a
        // NUL-terminated string, and its sockaddrs, each null or of the family it claims.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        let ip = |sa| unsafe { sockaddr_ip(sa) };
        let Some(addr) = ip(ifa.ifa_addr) else { continue };
        // With IFF_BROADCAST, ifa_ifu holds the broadcast address (else a point-to-point peer).
        let broadcast = ifa.ifa_flags & libc::IFF_BROADCAST as libc::c_uint != 0 && addr.is_ipv4();
        out.push(IfAddr {
            name: unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned(),
            up: ifa.ifa_flags & libc::IFF_UP as libc::c_uint != 0,
            addr,
            netmask: ip(ifa.ifa_netmask),
            broadcast: if broadcast { ip(ifa.ifa_ifu) } else { None },
        });
    }
    // SAFETY: head came from a successful getifaddrs and is freed once; nothing borrows it now.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The IP address in a sockaddr, if it is IPv4 or IPv6.
///
/// # Safety
/// `sa` is null or points to a live sockaddr of the family its `sa_family` names.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    // SAFETY: the caller's contract: the family tells which sockaddr type `sa` points to.
    // s_addr holds the address in network order, i.e. its bytes in memory are the octets.
    unsafe {
        match sa.as_ref()?.sa_family as i32 {
            libc::AF_INET => Some(IpAddr::from((*sa.cast::<libc::sockaddr_in>()).sin_addr.s_addr.to_ne_bytes())),
            libc::AF_INET6 => Some(IpAddr::from((*sa.cast::<libc::sockaddr_in6>()).sin6_addr.s6_addr)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_walker_finds_loopback() {
        let all = interfaces().unwrap();
        let lo = all.iter().find(|i| i.addr == IpAddr::from([127, 0, 0, 1])).expect("127.0.0.1 on some interface");
        assert!(lo.up && lo.name == "lo", "{lo:?}");
        assert_eq!(lo.netmask, Some(IpAddr::from([255, 0, 0, 0])));
    }

    #[test]
    fn uname_names_the_kernel() {
        let u = uname().unwrap();
        assert_eq!(u.sysname, "Linux");
        assert!(!u.release.is_empty() && !u.machine.is_empty() && !u.nodename.is_empty(), "{u:?}");
    }

    #[test]
    fn flock_is_exclusive_per_open_file_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let first = File::create(&path).unwrap();
        try_lock_exclusive(&first).unwrap();
        let second = File::open(&path).unwrap();
        assert_eq!(try_lock_exclusive(&second).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        drop(first);
        try_lock_exclusive(&second).unwrap();
    }

    #[test]
    fn process_exists_for_live_pids_only() {
        assert!(process_exists(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        // Reaped: the pid is free (reuse within these microseconds would need a wrapped pid space).
        assert!(!process_exists(pid));
        // Not process groups: 0 is our own group, u32::MAX would be -1 (every process).
        assert!(!process_exists(0) && !process_exists(u32::MAX));
    }

    #[test]
    fn account_lookups() {
        assert_eq!(user_by_name("root").unwrap(), Some((0, 0)));
        assert_eq!(group_by_name("root").unwrap(), Some(0));
        assert_eq!(user_by_name("no-such-user-wazuh").unwrap(), None);
        assert_eq!(user_by_name("ro\0ot").unwrap(), None);
        assert_eq!(group_by_name("no-such-group-wazuh").unwrap(), None);
        // A new file belongs to the effective ids.
        let dir = tempfile::tempdir().unwrap();
        let meta = File::create(dir.path().join("f")).unwrap().metadata().unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(effective_ids(), (meta.uid(), meta.gid()));
    }

    #[test]
    fn thread_nice_applies_to_the_calling_thread_only() {
        let nice_of = |stat: &str| -> i64 {
            stat[stat.rfind(')').unwrap() + 1..].split_whitespace().nth(16).unwrap().parse().unwrap()
        };
        let before = nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap());
        let niced = std::thread::spawn(move || {
            set_thread_nice(before as i32 + 1).unwrap();
            nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap())
        });
        assert_eq!(niced.join().unwrap(), before + 1);
        assert_eq!(nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap()), before);
    }
}
