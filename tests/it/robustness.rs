//! Robustness: kills, outages, token storms, hostile servers and a full disk. Short
//! versions run in CI; `RUN_SLOW_TESTS=1` makes them long.

use std::time::{Duration, Instant};

use wazuh_mock_server::{Fault, FaultAction};

use crate::support::*;

fn slow() -> bool {
    std::env::var_os("RUN_SLOW_TESTS").is_some_and(|v| v != "0")
}

#[test]
fn kill_9_loop_loses_no_acknowledged_stateful_event() {
    let env = Env::new();
    env.write_config("events.batch_interval = \"50ms\"");
    let mut agent = env.running_agent();
    let rounds = if slow() { 30 } else { 5 };
    let mut acknowledged = Vec::new();
    let mut next = 0usize;
    for round in 0..rounds {
        // A mixed stream, then a kill at a moment the test does not choose precisely.
        for _ in 0..3 {
            let out = env.send(&lines((next..next + 100).map(stateful).chain((next..next + 100).map(stateless))));
            if out.status.success() {
                acknowledged.extend((next..next + 100).map(|i| format!("pkg-{i}")));
            }
            next += 100;
        }
        std::thread::sleep(Duration::from_millis(fastrand_ms(round)));
        agent.signal(libc::SIGKILL);
        agent.wait_exit(Duration::from_secs(5));
        agent = env.running_agent();
    }
    assert!(env.mock.wait_until(Duration::from_secs(30), |m| {
        let got: std::collections::HashSet<String> = stateful_ids(m).into_iter().collect();
        acknowledged.iter().all(|id| got.contains(id))
    }));
    let (unique_ids, dups) = unique(stateful_ids(&env.mock));
    assert_eq!(unique_ids, acknowledged.len());
    // Only a batch in flight at a kill can be sent twice.
    assert!(dups <= rounds * 300, "{dups} duplicates over {rounds} kills");
}

/// A pseudo-random pause (0–150 ms) so kills land at different points of the stream.
fn fastrand_ms(round: usize) -> u64 {
    ((round as u64).wrapping_mul(2654435761) >> 7) % 150
}

#[test]
fn outage_with_a_restart_during_it_loses_nothing_acknowledged() {
    let env = Env::new();
    env.write_config("events.batch_interval = \"50ms\"\nretry.max = \"300ms\"");
    let mut agent = env.running_agent();
    env.mock.set_down(true);
    env.send_ok(&lines((0..200).map(stateful)));
    env.send_ok(&lines((0..300).map(stateless)));
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(0), "{}", agent.log());
    // Start again while the server is still away (it cannot authenticate yet).
    let _agent = env.spawn_agent();
    assert!(wait_for(Duration::from_secs(10), || env.socket().exists()));
    env.send_ok(&lines((200..300).map(stateful)));
    std::thread::sleep(Duration::from_millis(if slow() { 30_000 } else { 1_000 }));
    env.mock.set_down(false);
    assert!(env.mock.wait_until(Duration::from_secs(30), |m| m.stateful_events().len() >= 300
        && m.stateless_events().len() >= 300));
    assert_eq!(unique(stateful_ids(&env.mock)), (300, 0));
    assert_eq!(unique(originals(&env.mock)), (300, 0));
}

#[test]
fn token_storm_loses_nothing() {
    let env = Env::new();
    env.mock.set_token_lifetime(2);
    env.write_config("events.batch_interval = \"50ms\"");
    let _agent = env.running_agent();
    let until = Instant::now() + Duration::from_secs(if slow() { 60 } else { 6 });
    let mut sent = 0usize;
    let mut round = 0u64;
    while Instant::now() < until {
        if round % 3 == 0 {
            env.mock.expire_tokens();
        }
        env.send_ok(&lines((sent..sent + 50).map(stateless).chain((sent..sent + 50).map(stateful))));
        sent += 50;
        round += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(env.mock.wait_until(Duration::from_secs(30), |m| m.stateless_events().len() >= sent
        && m.stateful_events().len() >= sent));
    assert_eq!(unique(originals(&env.mock)), (sent, 0));
    assert_eq!(unique(stateful_ids(&env.mock)).0, sent);
}

#[test]
fn slow_servers_and_resets_neither_hang_nor_lose() {
    let env = Env::new();
    env.write_config("events.batch_interval = \"50ms\"\nserver.request_timeout = \"2s\"\nretry.max = \"300ms\"");
    let mut agent = env.running_agent();
    for (path, action) in [
        ("/api/v1/events/stateless", FaultAction::Delay { ms: 4_000 }),
        ("/api/v1/events/stateless", FaultAction::Reset),
        ("/api/v1/events/stateful", FaultAction::Reset),
        ("/api/v1/events/stateful", FaultAction::Delay { ms: 4_000 }),
    ] {
        env.mock.inject(Fault { path: path.into(), times: 1, action });
    }
    env.send_ok(&lines((0..100).map(stateless).chain((0..100).map(stateful))));
    assert!(env.mock.wait_until(Duration::from_secs(30), |m| m.stateless_events().len() >= 100
        && m.stateful_events().len() >= 100));
    assert_eq!(unique(originals(&env.mock)).0, 100);
    assert_eq!(unique(stateful_ids(&env.mock)).0, 100);
    // Still responsive and still stops cleanly.
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(0));
}

/// Mounts a tmpfs of `size` at `dir`; unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "mounting a tmpfs needs root: {}", text(&out));
        Tmpfs(dir.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_refuses_clearly_and_recovers() {
    let env = Env::new();
    env.registered();
    let queue_dir = env.data_dir().join("queue");
    let fs = Tmpfs::mount(&queue_dir, "1m");
    env.write_config("events.batch_interval = \"50ms\"");
    let agent = env.running_agent();
    env.mock.set_down(true);
    // ~1.3 MB of stateful events into a 1 MiB disk.
    let mut accepted = Vec::new();
    let mut saw_disk_error = false;
    for round in 0..10 {
        let out = env.send(&lines((round * 1000..(round + 1) * 1000).map(stateful)));
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let n = reply["accepted"].as_u64().unwrap() as usize;
        accepted.extend((round * 1000..round * 1000 + n).map(|i| format!("pkg-{i}")));
        if let Some(e) = reply["errors"].get(0).and_then(|e| e.as_str()) {
            assert!(e.contains("No space left") || e.contains("queue"), "{e}");
            saw_disk_error = true;
        }
    }
    assert!(saw_disk_error, "the disk filled up");
    assert!(!accepted.is_empty());
    // Space comes back: new events are accepted again, and everything acknowledged arrives.
    fs.resize("16m");
    env.send_ok(&lines((100_000..100_010).map(stateful)));
    accepted.extend((100_000..100_010).map(|i| format!("pkg-{i}")));
    env.mock.set_down(false);
    assert!(env.mock.wait_until(Duration::from_secs(30), |m| {
        let got: std::collections::HashSet<String> = stateful_ids(m).into_iter().collect();
        accepted.iter().all(|id| got.contains(id))
    }));
    assert!(agent.log().contains("No space left"), "the cause is logged: {}", agent.log());
}

/// Producers keep appending while small batches are read from the segment they append to,
/// across many segment rolls (the case `make bench` caught skipping records).
#[test]
fn a_stateful_stream_across_segment_rolls_is_delivered_exactly_once() {
    let env = Env::new();
    env.write_config("events.batch_max_events = 40");
    let agent = env.running_agent();
    let pad = "x".repeat(1500);
    let (producers, per_producer, per_send) = (4, if slow() { 3000 } else { 1000 }, 100);
    std::thread::scope(|s| {
        for p in 0..producers {
            let (env, pad) = (&env, &pad);
            s.spawn(move || {
                for chunk in (0..per_producer).collect::<Vec<_>>().chunks(per_send) {
                    env.send_ok(&lines(chunk.iter().map(|i| {
                        let id = p * per_producer + i;
                        format!(
                            r#"{{"header":{{"module":"inventory","collector":"packages","operation":"create","id":"pkg-{id}"}},"data":{{"package":{{"name":"p{id}","description":"{pad}"}}}}}}"#
                        )
                    })));
                }
            });
        }
    });
    let total = producers * per_producer;
    assert!(
        env.mock.wait_until(Duration::from_secs(60), |m| m.event_counts().1 >= total as u64),
        "{} of {total} delivered: {}",
        env.mock.event_counts().1,
        agent.log()
    );
    assert_eq!(unique(stateful_ids(&env.mock)), (total, 0));
}
