//! `make bench-fleet`: N real `wazuh-agent` processes against one in-process mock server, to
//! see what a fleet does to a server when all agents act at the same moment (issue 16,
//! docs/scaling.md). Prints one table and writes `target/bench/fleet.json`. Numbers, not
//! pass/fail.
//!
//! Phases, in order (each agent has its own data_dir, run_dir, config and pre-registered
//! credentials; settings at their defaults except paths and the server URL):
//!
//! 1. start: every agent up and polling (the mock holds a poll `--hold` seconds, then 408);
//! 2. outage: the server dies (`set_down`, held polls cut without an answer) for `--outage`
//!    seconds, then comes back: per-second arrivals until every agent polls again;
//! 3. 503: the server answers 503 to everything for `--outage` seconds (held polls cut with
//!    that 503): the NEW requests of the first second, then the same recovery curve;
//! 4. renewals: a `--token-lifetime` token and every token expired at one instant, so the whole
//!    fleet authenticates within about a second (as after a server restart); the idle window
//!    (`--idle` seconds, before the first renewal is due) measures requests, memory, CPU and
//!    threads; then the spread of the 1st and 2nd renewal rounds across agents;
//! 5. burst: 1 000 events (`--events`) through every agent's ingest socket at once;
//! 6. shutdown: SIGTERM to all, time to exit.
//!
//! Everything it starts dies with it: children are killed and reaped in `Fleet`'s Drop, and
//! each has PR_SET_PDEATHSIG = SIGKILL for the paths that skip Drop (release builds abort on
//! panic; Ctrl-C or a kill of the bench).
//!
//! Usage: wazuh-fleet-bench [--agent PATH] [--agents N] [--hold S] [--idle S] [--outage S]
//!                          [--token-lifetime S] [--events N] [--out FILE] [--extra TOML]

mod ingest;

use std::collections::{HashMap, HashSet};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wazuh_mock_server::{Arrival, MockServer, Options};

const POLL: &str = "/api/v1/commands";
const AUTH: &str = "/api/v1/authentication";

struct Args {
    agent: PathBuf,
    agents: usize,
    hold: u64,
    idle: u64,
    outage: u64,
    token_lifetime: u64,
    events: usize,
    out: PathBuf,
    /// TOML appended to every agent's configuration (`--extra`), e.g. "[inventory]\nenabled = false".
    extra: String,
}

fn args() -> Args {
    let mut a = Args {
        agent: PathBuf::from("target/release/wazuh-agent"),
        agents: 200,
        hold: 20,
        idle: 60,
        outage: 30,
        token_lifetime: 150,
        events: 1000,
        out: PathBuf::from("target/bench/fleet.json"),
        extra: String::new(),
    };
    let usage = "usage: wazuh-fleet-bench [--agent PATH] [--agents N] [--hold S] [--idle S] [--outage S] \
                 [--token-lifetime S] [--events N] [--out FILE] [--extra TOML]";
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut num = || it.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| panic!("{x} N; {usage}"));
        match x.as_str() {
            "--agents" => a.agents = num() as usize,
            "--hold" => a.hold = num(),
            "--idle" => a.idle = num(),
            "--outage" => a.outage = num(),
            "--token-lifetime" => a.token_lifetime = num(),
            "--events" => a.events = num() as usize,
            "--agent" => a.agent = PathBuf::from(it.next().expect("--agent PATH")),
            "--out" => a.out = PathBuf::from(it.next().expect("--out FILE")),
            "--extra" => a.extra = it.next().expect("--extra TOML").replace("\\n", "\n"),
            other => panic!("unknown argument {other}; {usage}"),
        }
    }
    assert!(a.agents > 0 && a.hold > 0 && a.token_lifetime >= 2, "{usage}");
    a
}

/// The agents. Dropping it kills and reaps every one still running.
struct Fleet {
    children: Vec<Option<Child>>,
    uuids: Vec<String>,
    run_dirs: Vec<PathBuf>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
        }
        for c in self.children.iter_mut().flatten() {
            let _ = c.wait();
        }
    }
}

impl Fleet {
    fn pids(&self) -> Vec<u32> {
        self.children.iter().flatten().map(Child::id).collect()
    }

    /// Panics (naming the agent's log) if an agent exited: a dead agent would skew every number.
    fn check_alive(&mut self) {
        for (i, c) in self.children.iter_mut().enumerate() {
            if let Some(Ok(Some(status))) = c.as_mut().map(Child::try_wait) {
                let log = self.run_dirs[i].parent().unwrap().join("agent.log");
                panic!("agent {i} exited ({status}); see {}", log.display());
            }
        }
    }
}

fn spawn_fleet(a: &Args, bin: &Path, dir: &Path, mock: &MockServer) -> Fleet {
    let mut fleet = Fleet { children: Vec::new(), uuids: Vec::new(), run_dirs: Vec::new() };
    for i in 0..a.agents {
        let home = dir.join(format!("a{i:05}"));
        let (data, run) = (home.join("data"), home.join("run"));
        std::fs::create_dir_all(&data).unwrap();
        // Pre-registered: the mock knows the agent and the agent has its credentials file, as
        // `--register` would leave them (registering 200 agents is not what is measured).
        let uuid = format!("0190a000-0000-7000-8000-{i:012x}");
        let key = format!("fleetkey{i:024}");
        mock.add_agent(&uuid, &key, &format!("fleet-{i}"));
        let creds = data.join("credentials.json");
        std::fs::write(&creds, json!({"uuid": uuid, "key": key, "name": format!("fleet-{i}")}).to_string()).unwrap();
        set_mode(&creds, 0o600);
        set_mode(&data, 0o700);
        let config = home.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\ndata_dir = {:?}\nrun_dir = {:?}\n[server]\nurl = {:?}\nca_file = {:?}\n[log]\nfile = {:?}\n",
                data.display().to_string(),
                run.display().to_string(),
                mock.comms_url(),
                mock.ca_file().display().to_string(),
                home.join("agent.log").display().to_string(),
            ) + &a.extra,
        )
        .unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. The agents
        // are spawned from the main thread, whose exit is the bench's: they die with it even
        // when Drop does not run (abort on panic, SIGINT, SIGKILL).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        fleet.children.push(Some(cmd.spawn().expect("spawn wazuh-agent")));
        fleet.uuids.push(uuid);
        fleet.run_dirs.push(run);
    }
    fleet
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// 200 agents hold ~4 sockets each in the mock (one thread and fd per connection), plus
/// their ingest sockets during the burst: the soft fd limit goes up to the hard one.
fn raise_fd_limit() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write/read only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        }
    }
    r.rlim_cur
}

fn cpu_secs(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = text.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// A `Key:   123 kB` field of a /proc file, in KiB.
fn proc_field(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// An interrupted run (Ctrl-C, kill) leaves its temporary directory: removed by the next run
/// once the process that made it is gone.
fn remove_stale_dirs() {
    for e in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("wazuh-fleet-").and_then(|p| p.parse::<u32>().ok()) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Per process, the memory no other process shares: Private_Clean + Private_Dirty, in MiB.
fn private_mib(pids: &[u32]) -> Vec<f64> {
    pids.iter()
        .map(|p| {
            let f = format!("/proc/{p}/smaps_rollup");
            (proc_field(&f, "Private_Clean:") + proc_field(&f, "Private_Dirty:")) as f64 / 1024.0
        })
        .collect()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn median(v: &mut [f64]) -> f64 {
    pct(v, 0.5)
}

/// The `p` quantile (nearest rank) of `v`, sorted in place; NaN when empty.
fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn secs(from: Instant, at: Instant) -> f64 {
    at.saturating_duration_since(from).as_secs_f64()
}

/// Arrivals per one-second bin from `from`, for `n` bins.
fn bins(arrivals: &[Arrival], from: Instant, n: usize) -> Vec<usize> {
    let mut out = vec![0; n];
    for a in arrivals.iter().filter(|a| a.at >= from) {
        let i = secs(from, a.at) as usize;
        if i < n {
            out[i] += 1;
        }
    }
    out
}

/// Per agent, the first poll that arrived at or after `from`, in seconds after it.
fn first_polls(arrivals: &[Arrival], from: Instant) -> HashMap<String, f64> {
    let mut first = HashMap::new();
    for a in arrivals.iter().filter(|a| a.at >= from && a.path == POLL) {
        if let Some(agent) = &a.agent {
            first.entry(agent.clone()).or_insert(secs(from, a.at));
        }
    }
    first
}

/// Waits until every agent's poll has arrived since `from` (or `cap` passed): the seconds
/// from `from` to the last one, and how many never came.
fn await_all_polling(mock: &MockServer, fleet: &mut Fleet, from: Instant, cap: Duration) -> (Option<f64>, usize) {
    let n = fleet.uuids.len();
    let end = Instant::now() + cap;
    loop {
        let first = first_polls(&mock.arrivals(), from);
        if first.len() >= n {
            return (first.values().copied().reduce(f64::max), 0);
        }
        if Instant::now() >= end {
            return (None, n - first.len());
        }
        fleet.check_alive();
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The reconnection curve after `up`: per-second arrivals until every agent polled again, the
/// time that took (and its median per agent), the peak second and the peak 5-second average
/// (less noisy: one second holds a handful of agents' requests).
fn recovery(mock: &MockServer, fleet: &mut Fleet, up: Instant, prefix: &str, out: &mut serde_json::Map<String, Value>) {
    let (all, missing) = await_all_polling(mock, fleet, up, Duration::from_secs(150));
    let span = all.unwrap_or(150.0).ceil().max(1.0) as usize;
    // The last bin complete before it is read.
    std::thread::sleep((up + Duration::from_secs(span as u64)).saturating_duration_since(Instant::now()));
    let arrivals = mock.arrivals();
    let mut firsts: Vec<f64> = first_polls(&arrivals, up).into_values().collect();
    let curve = bins(&arrivals, up, span);
    let peak5 = curve.windows(5.min(span)).map(|w| w.iter().sum::<usize>() as f64 / w.len() as f64).fold(0.0, f64::max);
    out.insert(format!("{prefix}_peak_5s_avg_req_per_s"), json!(peak5));
    out.insert(format!("{prefix}_first_5s_by_path"), by_path(&arrivals, up, 5.0));
    out.insert(format!("{prefix}_all_polling_s"), json!(all));
    out.insert(format!("{prefix}_agents_not_back"), json!(missing));
    out.insert(format!("{prefix}_median_back_s"), json!(median(&mut firsts)));
    out.insert(format!("{prefix}_peak_req_per_s"), json!(curve.iter().max()));
    out.insert(format!("{prefix}_bins_per_s"), json!(curve));
}

/// Arrivals in `[from, from + secs)` by method and path, e.g. {"GET /api/v1/commands": 12}.
fn by_path(arrivals: &[Arrival], from: Instant, secs_: f64) -> Value {
    let mut m: HashMap<String, usize> = HashMap::new();
    for a in arrivals.iter().filter(|a| a.at >= from && secs(from, a.at) < secs_) {
        *m.entry(format!("{} {}", a.method, a.path)).or_default() += 1;
    }
    json!(m)
}

fn event_line(agent: usize, i: usize) -> String {
    // About 200 bytes, like a syslog line with its header.
    format!(
        r#"{{"header":{{"module":"logcollector","collector":"file"}},"data":{{"event":{{"original":"Nov 26 15:00:00 web-01 sshd[811]: Accepted publickey for root from 10.0.0.1 port 52211 ssh2 a{agent:05} #{i:08}"}}}}}}"#
    )
}

/// Sends `per` events to every agent's ingest socket, 32 senders in parallel; the total accepted.
fn burst(fleet: &Fleet, per: usize) -> u64 {
    let loads: Vec<(PathBuf, Vec<u8>)> = fleet
        .run_dirs
        .iter()
        .enumerate()
        .map(|(a, run)| {
            let mut buf = Vec::with_capacity(per * 240);
            for i in 0..per {
                buf.extend_from_slice(event_line(a, i).as_bytes());
                buf.push(b'\n');
            }
            (run.join("ingest.sock"), buf)
        })
        .collect();
    let senders = 32.min(loads.len());
    let mut shares: Vec<Vec<(PathBuf, Vec<u8>)>> = (0..senders).map(|_| Vec::new()).collect();
    for (i, l) in loads.into_iter().enumerate() {
        shares[i % senders].push(l);
    }
    let threads: Vec<_> = shares
        .into_iter()
        .map(|share| {
            std::thread::spawn(move || share.iter().map(|(socket, buf)| ingest::send_one(socket, buf)).sum::<u64>())
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).sum()
}

fn main() {
    let a = args();
    let bin = std::fs::canonicalize(&a.agent)
        .unwrap_or_else(|_| panic!("{} not found: run `make bench-fleet`", a.agent.display()));
    let n = a.agents;
    let nofile = raise_fd_limit();
    remove_stale_dirs();
    let dir = std::env::temp_dir().join(format!("wazuh-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut opts = Options::new(&dir.join("mock"));
    opts.keep_events = false;
    opts.command_hold = Duration::from_secs(a.hold);
    let mock = MockServer::start(opts).expect("mock starts");
    let mut out = serde_json::Map::new();
    out.insert("agent_binary".into(), json!(bin.display().to_string()));
    out.insert("agents".into(), json!(n));
    out.insert("poll_hold_s".into(), json!(a.hold));
    out.insert("fd_limit".into(), json!(nofile));
    out.insert("loadavg_start".into(), json!(loadavg()));
    let t_bench = Instant::now();

    eprintln!("fleet: starting {n} agents …");
    let start = Instant::now();
    let mut fleet = spawn_fleet(&a, &bin, &dir, &mock);
    let (all, missing) = await_all_polling(&mock, &mut fleet, start, Duration::from_secs(120));
    assert_eq!(missing, 0, "{missing} agents never polled");
    out.insert("start_all_polling_s".into(), json!(all));
    // The first inventory scans go out at start: wait until the events stop (at most 60 s),
    // and until every agent holds a poll again.
    let mut last = (mock.event_counts(), Instant::now());
    while last.1.elapsed() < Duration::from_secs(3) && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(250));
        if mock.event_counts() != last.0 {
            last = (mock.event_counts(), Instant::now());
        }
    }
    out.insert("start_inventory_events".into(), json!(mock.event_counts().1));
    std::thread::sleep(Duration::from_secs(2));
    fleet.check_alive();
    // Memory right after start (first inventory scan done), to compare with the idle window's
    // (after the outage phases).
    out.insert("private_mib_after_start_median".into(), json!(median(&mut private_mib(&fleet.pids()))));

    eprintln!("fleet: outage of {} s …", a.outage);
    mock.set_down(true);
    // A dead server process takes its connections with it: held polls end without an answer.
    mock.end_holds(true);
    let (refused0, down_at) = (mock.traffic().refused, Instant::now());
    std::thread::sleep(Duration::from_secs(a.outage));
    let refused = mock.traffic().refused - refused0;
    out.insert("outage_reconnects_per_s".into(), json!(refused as f64 / down_at.elapsed().as_secs_f64()));
    let up = Instant::now();
    mock.set_down(false);
    recovery(&mock, &mut fleet, up, "outage", &mut out);
    // Every agent holding its poll again before the next fault.
    std::thread::sleep(Duration::from_secs(2));

    eprintln!("fleet: 503 to everything for {} s …", a.outage);
    let fault = Instant::now();
    mock.set_unavailable(true);
    std::thread::sleep(Duration::from_secs(a.outage));
    let up = Instant::now();
    mock.set_unavailable(false);
    {
        let arrivals = mock.arrivals();
        let during = bins(&arrivals, fault, a.outage as usize);
        // The polls held when the fault began were answered 503 at that instant; they arrived
        // before it, so they are not in `first_second_new_requests`.
        let cut = mock
            .requests()
            .iter()
            .filter(|r| r.path == POLL && r.status == 503 && r.at >= fault && secs(fault, r.at) < 0.5)
            .count()
            .saturating_sub(
                arrivals.iter().filter(|x| x.path == POLL && x.at >= fault && secs(fault, x.at) < 0.5).count(),
            );
        out.insert("first_second_new_requests".into(), json!(during[0]));
        out.insert("first_second_by_path".into(), by_path(&arrivals, fault, 1.0));
        out.insert("first_second_new_requests_per_agent".into(), json!(during[0] as f64 / n as f64));
        out.insert("fault_held_polls_cut".into(), json!(cut));
        out.insert("fault_requests_total".into(), json!(during.iter().sum::<usize>()));
        out.insert("fault_bins_per_s".into(), json!(during));
    }
    recovery(&mock, &mut fleet, up, "after_503", &mut out);
    std::thread::sleep(Duration::from_secs(2));

    eprintln!("fleet: renewals ({} s tokens, all expired at once) and the idle window …", a.token_lifetime);
    mock.set_token_lifetime(a.token_lifetime);
    mock.expire_tokens();
    // Every held poll answered 408 now: each agent polls again at once with its expired token,
    // is refused, and authenticates: the whole fleet within about a second.
    let sync = Instant::now();
    mock.end_holds(false);
    // The idle window starts once that settled and ends before the first renewal is due
    // (half the lifetime at the earliest); a longer `--idle` takes renewals in too (counted
    // apart, by path).
    std::thread::sleep(Duration::from_secs(10));
    let pids = fleet.pids();
    let (idle_from, a0, t0) = (Instant::now(), mock.arrivals().len(), mock.traffic());
    let cpu0: f64 = pids.iter().map(|&p| cpu_secs(p)).sum();
    std::thread::sleep(Duration::from_secs(a.idle));
    let cpu1: f64 = pids.iter().map(|&p| cpu_secs(p)).sum();
    let (window, t1) = (idle_from.elapsed().as_secs_f64(), mock.traffic());
    let arrivals = mock.arrivals();
    let idle: Vec<&Arrival> =
        arrivals[a0..].iter().filter(|x| x.at < idle_from + Duration::from_secs_f64(window)).collect();
    let per_agent_hour = |count: usize| count as f64 / n as f64 / window * 3600.0;
    let polls = idle.iter().filter(|x| x.path == POLL).count();
    let auths = idle.iter().filter(|x| x.path == AUTH).count();
    out.insert("idle_window_s".into(), json!(window));
    out.insert("idle_req_per_s_fleet".into(), json!(idle.len() as f64 / window));
    out.insert("idle_req_per_agent_hour".into(), json!(per_agent_hour(idle.len())));
    out.insert("idle_polls_per_agent_hour".into(), json!(per_agent_hour(polls)));
    out.insert("idle_auths_per_agent_hour".into(), json!(per_agent_hour(auths)));
    out.insert("idle_other_req_per_agent_hour".into(), json!(per_agent_hour(idle.len() - polls - auths)));
    out.insert("idle_cpu_s_per_agent_hour".into(), json!((cpu1 - cpu0) / n as f64 / window * 3600.0));
    out.insert("idle_open_connections_per_agent".into(), json!(t1.open as f64 / n as f64));
    out.insert(
        "idle_tls_handshakes_per_agent_hour".into(),
        json!(per_agent_hour((t1.connections - t0.connections) as usize)),
    );
    out.insert("idle_bytes_in_per_agent_s".into(), json!((t1.bytes_in - t0.bytes_in) as f64 / n as f64 / window));
    out.insert("idle_bytes_out_per_agent_s".into(), json!((t1.bytes_out - t0.bytes_out) as f64 / n as f64 / window));
    let mut private = private_mib(&pids);
    let mut pss: Vec<f64> =
        pids.iter().map(|p| proc_field(&format!("/proc/{p}/smaps_rollup"), "Pss:") as f64 / 1024.0).collect();
    let mut threads: Vec<f64> =
        pids.iter().map(|p| proc_field(&format!("/proc/{p}/status"), "Threads:") as f64).collect();
    out.insert("private_mib_per_agent_median".into(), json!(median(&mut private)));
    out.insert("private_mib_per_agent_max".into(), json!(pct(&mut private, 1.0)));
    out.insert("pss_mib_per_agent_median".into(), json!(median(&mut pss)));
    out.insert("threads_per_agent_median".into(), json!(median(&mut threads)));
    out.insert("threads_per_agent_max".into(), json!(pct(&mut threads, 1.0)));
    fleet.check_alive();

    // Rounds: each agent's successful authentications since `sync`, in order (round 0 is
    // the one the expiry forced; rounds 1 and 2 are renewals on schedule).
    let latest = a.token_lifetime.saturating_sub(60.max(a.token_lifetime / 10)).max(a.token_lifetime / 2);
    let rounds_end = sync + Duration::from_secs(2 * latest + 30);
    let rounds = |mock: &MockServer| {
        let mut per: HashMap<String, Vec<Instant>> = HashMap::new();
        for c in mock.auth_calls().into_iter().filter(|c| c.status == 200 && c.at >= sync) {
            per.entry(c.uuid).or_default().push(c.at);
        }
        per
    };
    let (r_from, r_arr, r_t) = (Instant::now(), mock.arrivals().len(), mock.traffic());
    while Instant::now() < rounds_end && rounds(&mock).values().filter(|v| v.len() >= 3).count() < n {
        std::thread::sleep(Duration::from_millis(500));
    }
    let per = rounds(&mock);
    {
        // What one renewal costs the server: the connections and bytes of this stretch less
        // what its polls cost at idle (the poll connection stays open: no handshakes).
        let (t, secs) = (mock.traffic(), r_from.elapsed().as_secs_f64());
        let renewals = mock.arrivals()[r_arr..].iter().filter(|x| x.path == AUTH).count().max(1) as f64;
        let idle_in = out["idle_bytes_in_per_agent_s"].as_f64().unwrap_or(0.0) * n as f64 * secs;
        let idle_out = out["idle_bytes_out_per_agent_s"].as_f64().unwrap_or(0.0) * n as f64 * secs;
        out.insert("renewal_tls_handshakes_each".into(), json!((t.connections - r_t.connections) as f64 / renewals));
        out.insert("renewal_bytes_in_each".into(), json!(((t.bytes_in - r_t.bytes_in) as f64 - idle_in) / renewals));
        out.insert(
            "renewal_bytes_out_each".into(),
            json!(((t.bytes_out - r_t.bytes_out) as f64 - idle_out) / renewals),
        );
    }
    for r in 0..3 {
        let mut at: Vec<f64> = per.values().filter_map(|v| v.get(r)).map(|t| secs(sync, *t)).collect();
        let agents = at.len();
        let (p0, p10, p90, p100) = (pct(&mut at, 0.0), pct(&mut at, 0.1), pct(&mut at, 0.9), pct(&mut at, 1.0));
        let mut per_s: HashMap<u64, usize> = HashMap::new();
        for t in &at {
            *per_s.entry(*t as u64).or_default() += 1;
        }
        out.insert(format!("renewal_round{r}_agents"), json!(agents));
        out.insert(format!("renewal_round{r}_first_s"), json!(p0));
        out.insert(format!("renewal_round{r}_spread_s"), json!(p100 - p0));
        out.insert(format!("renewal_round{r}_p10_p90_s"), json!(p90 - p10));
        out.insert(format!("renewal_round{r}_peak_per_s"), json!(per_s.values().max()));
    }
    let mut gaps: Vec<f64> =
        per.values().flat_map(|v| v.windows(2).map(|w| w[1].duration_since(w[0]).as_secs_f64())).collect();
    out.insert("renewal_interval_min_s".into(), json!(pct(&mut gaps, 0.0)));
    out.insert("renewal_interval_max_s".into(), json!(pct(&mut gaps, 1.0)));
    fleet.check_alive();

    eprintln!("fleet: burst of {n} × {} events …", a.events);
    let (base, reqs0, tr0) = (mock.event_counts().0, mock.arrivals().len(), mock.traffic());
    let want = (n * a.events) as u64;
    let t = Instant::now();
    let accepted = burst(&fleet, a.events);
    assert_eq!(accepted, want, "events accepted by the ingest sockets");
    let deadline = Instant::now() + Duration::from_secs(120);
    while mock.event_counts().0 - base < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let delivered_s = t.elapsed().as_secs_f64();
    // Late duplicates would arrive after the last original: give them a few seconds.
    std::thread::sleep(Duration::from_secs(3));
    let got = mock.event_counts().0 - base;
    let tr1 = mock.traffic();
    out.insert("burst_events".into(), json!(want));
    out.insert("burst_bytes_in_per_event".into(), json!((tr1.bytes_in - tr0.bytes_in) as f64 / want as f64));
    out.insert("burst_all_delivered_s".into(), json!((got >= want).then_some(delivered_s)));
    out.insert("burst_missing".into(), json!(want.saturating_sub(got)));
    out.insert("burst_duplicates".into(), json!(got.saturating_sub(want)));
    out.insert(
        "burst_requests".into(),
        json!(mock.arrivals()[reqs0..].iter().filter(|x| x.path.starts_with("/api/v1/events/")).count()),
    );

    // One event per agent, three times: what a request of a small batch costs (agent line,
    // headers, TLS). The last round is reported: by then both uploaders' connections are
    // open (the first round finds one closed for idleness: a handshake each).
    let (mut tr0, mut tr1, mut reqs) = (mock.traffic(), mock.traffic(), 0);
    for _ in 0..3 {
        let (base, c0) = (mock.event_counts().0, mock.arrivals().len());
        tr0 = mock.traffic();
        assert_eq!(burst(&fleet, 1), n as u64);
        let deadline = Instant::now() + Duration::from_secs(30);
        while mock.event_counts().0 - base < n as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(500));
        tr1 = mock.traffic();
        reqs = mock.arrivals()[c0..].iter().filter(|x| x.path.starts_with("/api/v1/events/")).count();
    }
    out.insert("single_event_requests".into(), json!(reqs));
    out.insert("single_event_bytes_in_each".into(), json!((tr1.bytes_in - tr0.bytes_in) as f64 / reqs.max(1) as f64));
    out.insert(
        "single_event_bytes_out_each".into(),
        json!((tr1.bytes_out - tr0.bytes_out) as f64 / reqs.max(1) as f64),
    );
    out.insert("single_event_tls_handshakes".into(), json!(tr1.connections - tr0.connections));

    eprintln!("fleet: SIGTERM to every agent …");
    fleet.check_alive();
    let stop = Instant::now();
    for p in fleet.pids() {
        // SAFETY: kill(2) on our own child's pid, not yet reaped.
        unsafe { libc::kill(p as libc::pid_t, libc::SIGTERM) };
    }
    let mut exit_s = Vec::new();
    let mut bad = 0;
    let mut left: HashSet<usize> = (0..n).collect();
    while !left.is_empty() && stop.elapsed() < Duration::from_secs(60) {
        for i in left.clone() {
            if let Some(Ok(Some(status))) = fleet.children[i].as_mut().map(Child::try_wait) {
                exit_s.push(stop.elapsed().as_secs_f64());
                bad += usize::from(!status.success());
                fleet.children[i] = None;
                left.remove(&i);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    out.insert("shutdown_median_s".into(), json!(median(&mut exit_s)));
    out.insert("shutdown_max_s".into(), json!(pct(&mut exit_s, 1.0)));
    out.insert("shutdown_nonzero_exits".into(), json!(bad));
    out.insert("shutdown_not_exited_60s".into(), json!(left.len()));
    drop(fleet);

    // Derived: the goals of issue 16, against the idle rate measured above.
    let idle_rate = out["idle_req_per_s_fleet"].as_f64().unwrap_or(f64::NAN);
    for p in ["outage", "after_503"] {
        let peak = out[&format!("{p}_peak_req_per_s")].as_f64().unwrap_or(f64::NAN);
        out.insert(format!("{p}_peak_vs_idle"), json!(peak / idle_rate));
        let peak5 = out[&format!("{p}_peak_5s_avg_req_per_s")].as_f64().unwrap_or(f64::NAN);
        out.insert(format!("{p}_peak_5s_avg_vs_idle"), json!(peak5 / idle_rate));
    }
    out.insert("loadavg_end".into(), json!(loadavg()));
    out.insert("bench_s".into(), json!(t_bench.elapsed().as_secs_f64()));

    let report = Value::Object(out);
    println!("{:<40} {:>16}", "metric", "value");
    if let Value::Object(m) = &report {
        for (k, v) in m.iter().filter(|(k, _)| !k.ends_with("_bins_per_s")) {
            let shown = match v.as_f64() {
                Some(f) if f.fract() != 0.0 => format!("{f:.2}"),
                _ => v.to_string(),
            };
            println!("{k:<40} {shown:>16}");
        }
        for (k, v) in m.iter().filter(|(k, _)| k.ends_with("_bins_per_s")) {
            println!("{k}: {v}");
        }
    }
    if let Some(parent) = a.out.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&report).unwrap() + "\n").unwrap();
    println!("\nwritten to {}", a.out.display());
    println!(
        "first second after a fleet-wide 503: {} new requests = {:.2} × N (goal ≤ 0.5 × N)",
        report["first_second_new_requests"], report["first_second_new_requests_per_agent"]
    );
    drop(mock);
    let _ = std::fs::remove_dir_all(&dir);
}
