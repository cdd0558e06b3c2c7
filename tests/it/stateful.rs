//! Stateful per-item results against a server that lost documents (docs/protocol.md, Stateful
//! results): the agent heals what it can, in one follow-up request, and never loops.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use wazuh_mock_server::{Fault, FaultAction, MockServer};

use crate::support::*;

const STATEFUL: &str = "/api/v1/events/stateful";

fn line(op: &str, id: &str, data: Option<Value>) -> String {
    let header = json!({"module": "inventory", "collector": "packages", "operation": op, "id": id});
    json!({"header": header, "data": data}).to_string()
}

fn package(name: &str) -> Option<Value> {
    Some(json!({"package": {"name": name}}))
}

/// `(events.sent, events.rejected)` once state.json shows `want` (polled: it is rewritten every 5 s).
fn counters(env: &Env, want: (u64, u64)) -> (u64, u64) {
    let path = env.dir.path().join("run").join("state.json");
    let read = || {
        let s: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_default()).unwrap_or_default();
        (s["events"]["sent"].as_u64().unwrap_or(0), s["events"]["rejected"].as_u64().unwrap_or(0))
    };
    wait_for(Duration::from_secs(15), || read() == want);
    read()
}

/// The operations the mock received for `id`, in order.
fn operations(mock: &MockServer, id: &str) -> Vec<String> {
    let ops = mock.stateful_events().into_iter().filter(|e| e.header["id"] == id);
    ops.map(|e| e.header["operation"].as_str().unwrap_or_default().to_string()).collect()
}

#[test]
fn stateful_state_heals_itself_against_a_server_that_lost_documents() {
    let env = Env::with(|o| o.documents = true);
    env.write_config("events.batch_interval = \"100ms\"");
    env.mock.seed_document("pkg-exists", package("old").unwrap());
    env.mock.seed_document("pkg-kept", package("kept-1").unwrap());
    let agent = env.running_agent();
    let reply = env.send_ok(&lines([
        line("update", "pkg-missing", package("new")),
        line("create", "pkg-exists", package("fresh")),
        line("delete", "pkg-gone", None),
        line("create", "pkg-1", package("p1")),
        // Updated while missing, then deleted: re-creating it would bring a deleted document back.
        line("update", "pkg-twice", package("twice")),
        line("delete", "pkg-twice", None),
        line("update", "pkg-kept", package("kept-2")),
    ]));
    assert_eq!(reply["accepted"], 7);
    let want: HashMap<String, Value> = [
        ("pkg-missing", package("new")),
        ("pkg-exists", package("fresh")),
        ("pkg-1", package("p1")),
        ("pkg-kept", package("kept-2")),
    ]
    .into_iter()
    .map(|(id, doc)| (id.to_string(), doc.unwrap()))
    .collect();
    let healed = env.mock.wait_until(Duration::from_secs(15), |m| m.documents() == want);
    assert!(healed, "documents {:?}\n{}", env.mock.documents(), agent.log());
    // Each event counts once: sent, none rejected (the follow-up's two included once).
    assert_eq!(counters(&env, (7, 0)), (7, 0), "{}", agent.log());

    assert_eq!(operations(&env.mock, "pkg-missing"), ["update", "create"]);
    assert_eq!(operations(&env.mock, "pkg-exists"), ["create", "update"]);
    assert_eq!(operations(&env.mock, "pkg-gone"), ["delete"], "a delete of a missing id is done");
    assert_eq!(operations(&env.mock, "pkg-twice"), ["update", "delete"], "superseded: not healed");
    // The healed header is the producer's with only the operation changed.
    let healed = env.mock.stateful_events().into_iter().filter(|e| e.header["id"] == "pkg-missing").nth(1).unwrap();
    let header = json!({"module": "inventory", "collector": "packages", "operation": "create", "id": "pkg-missing"});
    assert_eq!(healed.header, header);
    let posts = env.mock.requests().into_iter().filter(|r| r.path == STATEFUL && r.status == 200).count();
    assert_eq!(posts, 2, "the batch, then one follow-up for both healed events");
    let summary = "stateful batch of 7: 1 updates of missing documents re-sent as creates, 1 creates of existing \
                   documents re-sent as updates, 2 deletes of missing documents counted as done, 0 events not applied";
    assert_eq!(agent.log().matches(summary).count(), 1, "one line per batch: {}", agent.log());
    assert!(!env.data_dir().join("rejected.ndjson").exists(), "nothing was rejected");
}

#[test]
fn a_healed_event_that_fails_again_is_rejected_and_recorded_not_healed_again() {
    let env = Env::new();
    env.write_config("events.batch_interval = \"100ms\"");
    let agent = env.running_agent();
    // The update finds no document; by the time its create comes, someone else made one.
    for (status, result) in [(404, "document missing"), (409, "version conflict")] {
        let body = json!({"results": [{"id": "pkg-7", "result": result, "status": status}]}).to_string();
        let action = FaultAction::Status { code: 200, retry_after: None, body: Some(body) };
        env.mock.inject(Fault { path: STATEFUL.into(), times: 1, action });
    }
    env.send_ok(&lines([line("update", "pkg-7", package("seven"))]));
    assert_eq!(counters(&env, (0, 1)), (0, 1), "{}", agent.log());
    let rejected = std::fs::read_to_string(env.data_dir().join("rejected.ndjson")).unwrap();
    let rows: Vec<Value> = rejected.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 1, "{rejected}");
    assert_eq!(rows[0]["status"], 409);
    assert_eq!(rows[0]["header"]["operation"], "create", "the healed event is the one recorded");
    assert_eq!(rows[0]["data"], package("seven").unwrap());
    assert!(rows[0]["reason"].as_str().unwrap().contains("version conflict"));
    let posts = env.mock.requests().into_iter().filter(|r| r.path == STATEFUL).count();
    assert_eq!(posts, 2, "the update, its create, and nothing more");
    assert!(env.mock.stateful_events().is_empty());
}
