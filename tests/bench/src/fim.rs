//! The `fim` phase of `make bench`: agents with file integrity monitoring alone (inventory off,
//! no followed files, every path realtime) against a mock of their own that times each `fim`
//! notification as it arrives (`Options::timed_module`). In order:
//!
//! 1. first scan of 100 000 files of ~80 bytes in 1 000 directories (20 000 with `--quick`),
//!    `fim.max_eps` out of the way: agent start → every create acknowledged by the mock; CPU
//!    seconds and VmHWM of the agent;
//! 2. rescan, nothing changed: the agent restarted (`scan_on_start`): start → the scan's log
//!    line, the scan's own time from that line, CPU seconds, VmHWM;
//! 3. realtime latency, write → the file's `modified` notification at the mock, writes 100 ms
//!    apart, on that tree (each partial scan streams the whole snapshot) and, another agent, on
//!    a tree of 100 files; the partial scans' own times from the agent's (debug) log;
//! 4. a write storm: 5 000 files rewritten flat out under `fim.max_eps = 200` (the baseline is
//!    taken at full speed, then the agent restarts with 200): the notifications' arrival rate,
//!    the most in any 1 s and 5 s, the time until all arrived, CPU seconds meanwhile.
//!
//! Numbers only. Every wait has a deadline, and a panic names what did not arrive.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use wazuh_mock_server::{MockServer, Options};

use crate::{Agent, agent_config, await_delivery, cpu_secs, pct, proc_status, register, reset_peak, wait_for};

/// The storm: files rewritten at once, and the rate they are held to.
const STORM_FILES: usize = 5000;
const STORM_EPS: usize = 200;
/// Realtime latency: writes one at a time, this far apart.
const GAP: Duration = Duration::from_millis(100);

/// `n` files of ~80 bytes, 100 a directory, beneath `<host>/<top>`; their paths as configured
/// (`/<top>/dNNN/fNN`).
fn tree(host: &Path, top: &str, n: usize) -> Vec<String> {
    let mut paths = Vec::with_capacity(n);
    for d in 0..n.div_ceil(100) {
        let dir = host.join(format!("{top}/d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..(n - d * 100).min(100) {
            std::fs::write(dir.join(format!("f{f:02}")), format!("{d}/{f}: {}", "x".repeat(64))).unwrap();
            paths.push(format!("/{top}/d{d:03}/f{f:02}"));
        }
    }
    paths
}

/// The configuration of an agent at `home` monitoring `/<top>` beneath `host` in realtime.
fn config(home: &Path, mock: &MockServer, host: &Path, top: &str, max_eps: usize) -> PathBuf {
    let fim = format!(
        "[fim]\nenabled = true\nroot = {:?}\npaths = [{{ path = \"/{top}\", realtime = true }}]\ninterval = \"1h\"\n\
         max_eps = {max_eps}\nmax_files = 1000000\n",
        host.display().to_string()
    );
    // debug: the partial scans' log lines.
    agent_config(home, mock, "debug", &fim)
}

/// The agent's log lines of one kind of scan so far: `full scan` (info) or `changes` (a
/// partial scan, debug).
fn scans(home: &Path, kind: &str) -> Vec<String> {
    let log = std::fs::read_to_string(home.join("agent.log")).unwrap_or_default();
    log.lines().filter(|l| l.contains(&format!("fim: {kind}:"))).map(str::to_string).collect()
}

/// Waits at most `secs` for the `n`-th full scan's log line and returns it; panics with the
/// log's tail if it does not come.
fn await_scan(home: &Path, n: usize, secs: u64) -> String {
    if !wait_for(Duration::from_secs(secs), || scans(home, "full scan").len() >= n) {
        let log = std::fs::read_to_string(home.join("agent.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        panic!("fim: full scan #{n} not logged within {secs} s; the log's last lines, newest first: {tail:#?}");
    }
    scans(home, "full scan").swap_remove(n - 1)
}

/// From a scan's log line: the scan's own milliseconds, and its changes ("0 created, 0
/// updated, 0 deleted").
fn scan_ms_and_changes(line: &str) -> (f64, String) {
    let ms = line.split("(scan ").nth(1).and_then(|r| r.split(" ms)").next()).and_then(|v| v.parse().ok());
    let changes = line.split("); ").nth(1).and_then(|r| r.split(';').next()).unwrap_or("?");
    (ms.unwrap_or(f64::NAN), changes.to_string())
}

/// The `modified` notifications seen at the mock so far, by path, each with when it arrived.
#[derive(Default)]
struct Notes {
    seen: usize,
    by_path: HashMap<String, Vec<Instant>>,
    all: Vec<Instant>,
}

impl Notes {
    /// From the notifications the mock has now (earlier ones are not counted).
    fn from_now(mock: &MockServer) -> Notes {
        Notes { seen: mock.timed_events(0).len(), ..Notes::default() }
    }

    fn update(&mut self, mock: &MockServer) {
        for (at, e) in mock.timed_events(self.seen) {
            self.seen += 1;
            let data = e.data.unwrap_or_default();
            if data["event"]["type"] == "modified" {
                let path = data["file"]["path"].as_str().unwrap_or_default().to_string();
                self.by_path.entry(path).or_default().push(at);
                self.all.push(at);
            }
        }
    }

    /// The first notification of `path` that arrived at or after `since`.
    fn after(&self, path: &str, since: Instant) -> Option<Instant> {
        self.by_path.get(path)?.iter().copied().find(|at| *at >= since)
    }
}

/// Rewrites `writes` of `files` (spread over the tree) one at a time, `GAP` apart, and returns,
/// sorted, write → the file's `modified` notification at the mock, in ms. Panics naming what
/// did not arrive within 120 s of the last write.
fn latencies(mock: &MockServer, host: &Path, files: &[String], writes: usize, what: &str) -> Vec<f64> {
    let mut notes = Notes::from_now(mock);
    let mut sent = Vec::with_capacity(writes);
    for j in 0..writes {
        // 7919 is prime: the writes visit every file before one comes again.
        let path = files[j * 7919 % files.len()].as_str();
        sent.push((path, Instant::now()));
        std::fs::write(host.join(&path[1..]), format!("write {j}: {}", "y".repeat(64))).unwrap();
        std::thread::sleep(GAP);
    }
    let done = |n: &Notes| sent.iter().all(|(p, t)| n.after(p, *t).is_some());
    wait_for(Duration::from_secs(120), || (notes.update(mock), done(&notes)).1);
    let missing: Vec<&str> = sent.iter().filter(|(p, t)| notes.after(p, *t).is_none()).map(|s| s.0).collect();
    assert!(
        missing.is_empty(),
        "fim realtime latency ({what}): {} of {writes} writes got no `modified` notification at the mock within 120 s \
         of the last write, first {:?}; {} notifications arrived",
        missing.len(),
        missing.first(),
        notes.all.len()
    );
    let mut ms: Vec<f64> =
        sent.iter().map(|(p, t)| notes.after(p, *t).unwrap().duration_since(*t).as_secs_f64() * 1000.0).collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ms
}

/// The latencies, and the partial scans' own times from the log of the agent at `home`.
fn put_latencies(out: &mut Map<String, Value>, what: &str, ms: &[f64], home: &Path) {
    out.insert(format!("fim_realtime_{what}_writes"), json!(ms.len()));
    out.insert(format!("fim_realtime_{what}_p50_ms"), json!(pct(ms, 0.5)));
    out.insert(format!("fim_realtime_{what}_p99_ms"), json!(pct(ms, 0.99)));
    out.insert(format!("fim_realtime_{what}_max_ms"), json!(pct(ms, 1.0)));
    let mut partial: Vec<f64> = scans(home, "changes").iter().map(|l| scan_ms_and_changes(l).0).collect();
    partial.sort_by(|a, b| a.partial_cmp(b).unwrap());
    out.insert(format!("fim_realtime_{what}_partial_scans"), json!(partial.len()));
    out.insert(format!("fim_realtime_{what}_partial_p50_ms"), json!(pct(&partial, 0.5)));
    out.insert(format!("fim_realtime_{what}_partial_max_ms"), json!(pct(&partial, 1.0)));
}

/// Starts an agent (registered first) monitoring `/<top>` and waits for its baseline: `n`
/// creates acknowledged (the scan's log line may come a little later: `await_scan`). Returns
/// it with when it was started.
fn baseline(mock: &MockServer, bin: &Path, home: &Path, host: &Path, top: &str, n: usize) -> (Agent, Instant) {
    let config = config(home, mock, host, top, 1_000_000);
    register(bin, &config, home);
    let s0 = mock.event_counts().1;
    let (agent, start) = (Agent::spawn(bin, &config), Instant::now());
    await_delivery(mock, true, s0 + n as u64, &format!("fim first scan of /{top}"), &home.join("run"));
    (agent, start)
}

pub fn run(bin: &Path, dir: &Path, quick: bool, out: &mut Map<String, Value>) {
    let mut opts = Options::new(&dir.join("mock"));
    opts.keep_events = false;
    opts.timed_module = Some("fim".into());
    opts.max_body = 64 << 20;
    let mock = MockServer::start(opts).expect("mock starts");
    let host = dir.join("host");
    let n = if quick { 20_000 } else { 100_000 };
    let writes = if quick { 50 } else { 200 };

    eprintln!("bench: FIM first scan of {n} files …");
    let big = tree(&host, "big", n);
    let home = dir.join("big");
    let (agent, start) = baseline(&mock, bin, &home, &host, "big", n);
    out.insert("fim_files".into(), json!(n));
    out.insert("fim_first_scan_s".into(), json!(start.elapsed().as_secs_f64()));
    out.insert("fim_first_scan_cpu_s".into(), json!(cpu_secs(agent.pid())));
    out.insert("fim_first_scan_peak_rss_kib".into(), json!(proc_status(agent.pid(), "VmHWM:")));
    let (ms, _) = scan_ms_and_changes(&await_scan(&home, 1, 600));
    out.insert("fim_first_scan_log_ms".into(), json!(ms));

    eprintln!("bench: FIM rescan …");
    agent.stop();
    let (agent, start) = (Agent::spawn(bin, &home.join("agent.toml")), Instant::now());
    let (ms, changes) = scan_ms_and_changes(&await_scan(&home, 2, 600));
    out.insert("fim_rescan_s".into(), json!(start.elapsed().as_secs_f64()));
    out.insert("fim_rescan_log_ms".into(), json!(ms));
    out.insert("fim_rescan_changes".into(), json!(changes));
    out.insert("fim_rescan_cpu_s".into(), json!(cpu_secs(agent.pid())));
    out.insert("fim_rescan_peak_rss_kib".into(), json!(proc_status(agent.pid(), "VmHWM:")));

    eprintln!("bench: FIM realtime latency, {n} files …");
    reset_peak(agent.pid());
    let cpu0 = cpu_secs(agent.pid());
    let ms = latencies(&mock, &host, &big, writes, &format!("{n} files"));
    put_latencies(out, "large", &ms, &home);
    out.insert("fim_realtime_large_cpu_s".into(), json!(cpu_secs(agent.pid()) - cpu0));
    out.insert("fim_realtime_large_peak_rss_kib".into(), json!(proc_status(agent.pid(), "VmHWM:")));
    agent.stop();

    eprintln!("bench: FIM realtime latency, 100 files …");
    let small = tree(&host, "small", 100);
    let (agent, _) = baseline(&mock, bin, &dir.join("small"), &host, "small", small.len());
    await_scan(&dir.join("small"), 1, 60);
    let ms = latencies(&mock, &host, &small, writes, "100 files");
    put_latencies(out, "small", &ms, &dir.join("small"));
    agent.stop();

    eprintln!("bench: FIM write storm, {STORM_FILES} files at max_eps {STORM_EPS} …");
    storm(&mock, bin, &dir.join("storm"), &host, out);
}

/// Phase 4: the baseline at full speed, then the agent restarted with `max_eps = STORM_EPS`
/// and every file rewritten at once.
fn storm(mock: &MockServer, bin: &Path, home: &Path, host: &Path, out: &mut Map<String, Value>) {
    let files = tree(host, "storm", STORM_FILES);
    let (agent, _) = baseline(mock, bin, home, host, "storm", STORM_FILES);
    await_scan(home, 1, 60);
    agent.stop();
    let agent = Agent::spawn(bin, &config(home, mock, host, "storm", STORM_EPS));
    await_scan(home, 2, 120);
    let pid = agent.pid();
    let (mut notes, s0) = (Notes::from_now(mock), mock.event_counts().1);
    reset_peak(pid);
    let (start, cpu0) = (Instant::now(), cpu_secs(pid));
    for (j, p) in files.iter().enumerate() {
        std::fs::write(host.join(&p[1..]), format!("storm {j}: {}", "z".repeat(64))).unwrap();
    }
    let written = start.elapsed().as_secs_f64();
    // Four times what max_eps allows, and a minute.
    let limit = Duration::from_secs((STORM_FILES / STORM_EPS * 4 + 60) as u64);
    let all = |n: &Notes| files.iter().all(|p| n.by_path.contains_key(p));
    wait_for(limit, || (notes.update(mock), all(&notes)).1);
    let missing = files.iter().filter(|p| !notes.by_path.contains_key(*p)).count();
    assert!(
        missing == 0,
        "fim storm: {missing} of {STORM_FILES} rewritten files got no `modified` notification at the mock within {} s \
         ({} notifications arrived, {} stateful events); agent log: {}",
        limit.as_secs(),
        notes.all.len(),
        mock.event_counts().1 - s0,
        home.join("agent.log").display()
    );
    let (first, last) = (notes.all[0], *notes.all.last().unwrap());
    let cpu = cpu_secs(pid) - cpu0;
    let most = |secs: u64| {
        let (window, all) = (Duration::from_secs(secs), &notes.all);
        (0..all.len()).map(|i| all[i..].iter().take_while(|at| at.duration_since(all[i]) < window).count()).max()
    };
    await_delivery(mock, true, s0 + STORM_FILES as u64, "fim storm (stateful updates)", &home.join("run"));
    let log = std::fs::read_to_string(home.join("agent.log")).unwrap_or_default();
    out.insert("fim_storm_files".into(), json!(STORM_FILES));
    out.insert("fim_storm_max_eps".into(), json!(STORM_EPS));
    out.insert("fim_storm_write_s".into(), json!(written));
    out.insert("fim_storm_notifications".into(), json!(notes.all.len()));
    out.insert("fim_storm_stateful".into(), json!(mock.event_counts().1 - s0));
    out.insert(
        "fim_storm_events_per_s".into(),
        json!((notes.all.len() - 1) as f64 / last.duration_since(first).as_secs_f64()),
    );
    // Paced a chunk at a time (max_eps changes at once, the next a second later): a 1 s window
    // can hold two chunks; 5 s shows the sustained rate.
    out.insert("fim_storm_most_in_1s".into(), json!(most(1)));
    out.insert("fim_storm_most_in_5s".into(), json!(most(5)));
    out.insert("fim_storm_first_s".into(), json!(first.duration_since(start).as_secs_f64()));
    out.insert("fim_storm_all_s".into(), json!(last.duration_since(start).as_secs_f64()));
    out.insert("fim_storm_cpu_s".into(), json!(cpu));
    out.insert("fim_storm_cpu_percent".into(), json!(cpu / last.duration_since(start).as_secs_f64() * 100.0));
    out.insert("fim_storm_peak_rss_kib".into(), json!(proc_status(pid, "VmHWM:")));
    out.insert("fim_storm_overflow_full_scan".into(), json!(log.contains("the inotify queue overflowed")));
    agent.stop();
}
