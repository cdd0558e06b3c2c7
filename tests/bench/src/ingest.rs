//! One producer connection to an agent's ingest socket, shared by both benches.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Writes `buf` (NDJSON lines) on one connection, half-closes it, and returns how many events
/// the agent's one-line reply says it accepted.
pub fn send_one(socket: &Path, buf: &[u8]) -> u64 {
    let mut s = UnixStream::connect(socket).expect("connect to an ingest socket");
    s.write_all(buf).expect("write events");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    let v: serde_json::Value = serde_json::from_str(&reply).expect("ingest reply");
    v["accepted"].as_u64().unwrap_or(0)
}
