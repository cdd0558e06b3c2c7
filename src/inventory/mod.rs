//! The inventory thread: scans the host on start and every `inventory.interval`, sends stateful
//! `create`/`update`/`delete` events for exactly what changed since the last scan, plus stateless
//! change notifications after the first scan (docs/events.md). The previous scan is kept in
//! `<data_dir>/inventory.json`, replaced only after the new scan's events are durable in the queue.

pub mod collectors;

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::time::SystemTime;

use crossbeam_channel::select;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::{Config, InventoryConfig};
use crate::event::{Event, Kind};
use crate::module::{Context, Module, SinkError};
use crate::status::{self, Stats};
use collectors::{Doc, Unreadable};

pub const MODULE: Module = Module {
    name: "inventory",
    section: "inventory",
    state: "inventory.json",
    enabled: |c| c.inventory.enabled && !c.inventory.collectors.is_empty(),
    run,
};

/// Stateful events per durable append (bounded memory per round trip).
const APPEND_CHUNK: usize = 1000;
/// Longest document: its notification (it and a reason quoting up to 3 fields) fits a record.
pub const MAX_DOC_BYTES: usize = crate::event::MAX_RECORD_BYTES / 8;

/// `id` = lowercase hex SHA-1 of `"<agent uuid>:<primary key>"`.
pub fn doc_id(uuid: &str, key: &str) -> String {
    sha1_smol::Sha1::from(format!("{uuid}:{key}")).digest().to_string()
}

/// A document as stored in the snapshot: compact JSON text (a `Value` costs several times more; think packages).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub collector: String,
    pub doc: String,
}

impl Stored {
    /// The document parsed, for the few places that look inside (changed documents).
    pub fn value(&self) -> Value {
        serde_json::from_str(&self.doc).unwrap_or(Value::Null)
    }
}

/// Documents by id.
pub type Docs = BTreeMap<String, Stored>;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub uuid: String,
    pub docs: Docs,
}

/// One difference between two scans.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Create { id: String, new: Stored },
    Update { id: String, old: Stored, new: Stored },
    Delete { id: String, old: Stored },
}

impl Change {
    /// The change from `old` to `new` of one key, if any (`same`: whether two documents count as equal).
    pub fn of(
        id: String,
        old: Option<Stored>,
        new: Option<Stored>,
        same: fn(&Stored, &Stored) -> bool,
    ) -> Option<Self> {
        match (old, new) {
            (None, Some(new)) => Some(Change::Create { id, new }),
            (Some(old), None) => Some(Change::Delete { id, old }),
            (Some(old), Some(new)) => (!same(&old, &new)).then_some(Change::Update { id, old, new }),
            (None, None) => None,
        }
    }
}

/// The document without the fields that move on every scan.
fn comparable(s: &Stored) -> std::borrow::Cow<'_, str> {
    // (object, field): the field is removed from the object at that JSON pointer.
    let volatile: &[(&str, &str)] = match s.collector.as_str() {
        "hardware" => &[("/host/memory", "free"), ("/host/memory", "used")],
        "networks" | "ports" => &[("/host", "network")],
        _ => return std::borrow::Cow::Borrowed(&s.doc),
    };
    let mut d = s.value();
    for (parent, field) in volatile {
        // Only objects are walked; a missing step means there is nothing to strip.
        if let Some(Value::Object(o)) = d.pointer_mut(parent) {
            o.remove(*field);
        }
    }
    std::borrow::Cow::Owned(d.to_string())
}

/// The next snapshot's documents (pure): those found, plus the previous ones of the collectors in `failed`, unchanged.
pub fn merge(old: &Docs, mut found: Docs, failed: &[&str]) -> Docs {
    let kept = old.iter().filter(|(_, s)| failed.contains(&s.collector.as_str()));
    found.extend(kept.map(|(id, s)| (id.clone(), s.clone())));
    found
}

/// What changed (pure): documents of `new` that `old` lacks or has otherwise, and those of `old` that `new` lacks.
pub fn diff(old: &Docs, new: &Docs) -> Vec<Change> {
    let (mut out, owned) = (Vec::new(), |(k, v): (&String, &Stored)| (k.clone(), v.clone()));
    let _ = merge_join::<_, ()>(old.iter().map(owned), new.iter().map(owned), |id, o, n| {
        out.extend(Change::of(id, o, n, |a, b| comparable(a) == comparable(b)));
        Ok(())
    });
    out
}

/// A merge-join (pure) of two sequences sorted by key, each key once: `each` gets every key with its old and new
/// value (either may be absent), in order; memory does not grow with the length (FIM streams its snapshot).
pub fn merge_join<K: Ord, E>(
    old: impl Iterator<Item = (K, Stored)>,
    new: impl Iterator<Item = (K, Stored)>,
    mut each: impl FnMut(K, Option<Stored>, Option<Stored>) -> Result<(), E>,
) -> Result<(), E> {
    let (mut old, mut new) = (old.peekable(), new.peekable());
    loop {
        let order = match (old.peek(), new.peek()) {
            (Some(o), Some(n)) => o.0.cmp(&n.0),
            (o, _) => o.map_or(Ordering::Greater, |_| Ordering::Less),
        };
        let (o, n) = (order.is_le().then(|| old.next()).flatten(), order.is_ge().then(|| new.next()).flatten());
        match (o, n) {
            (Some((k, o)), n) => each(k, Some(o), n.map(|(_, n)| n))?,
            (None, Some((k, n))) => each(k, None, Some(n))?,
            (None, None) => return Ok(()),
        }
    }
}

/// The document with `@timestamp` first (text surgery: the document is an object).
fn stamped(doc: &str, now: &str) -> String {
    let stamp = format!("{{\"@timestamp\":{}", Value::String(now.to_string()));
    match doc.strip_prefix('{').map(str::trim_start) {
        Some(rest) if rest.starts_with('}') => format!("{stamp}{rest}"),
        Some(rest) => format!("{stamp},{rest}"),
        None => format!("{stamp}}}"),
    }
}

pub fn stateful_events(changes: &[Change], now: &str, module: &str) -> Vec<Event> {
    let event = |c: &Change| {
        let (id, collector, op, doc) = match c {
            Change::Create { id, new } => (id, &new.collector, "create", Some(&new.doc)),
            Change::Update { id, new, .. } => (id, &new.collector, "update", Some(&new.doc)),
            Change::Delete { id, old } => (id, &old.collector, "delete", None),
        };
        let header = json!({"collector": collector, "id": id, "module": module, "operation": op}).to_string();
        Event::new(Kind::Stateful, &header, doc.map(|d| stamped(d, now)).as_deref())
    };
    changes.iter().map(event).collect()
}

/// How notifications name a document: its collector's noun and ECS category, and the document.
fn describe(s: &Stored) -> (&'static str, &'static str, String) {
    let v = s.value();
    let text = |pointer| v.pointer(pointer).and_then(Value::as_str).unwrap_or("?");
    match s.collector.as_str() {
        "packages" => ("package", "package", format!("{} ({})", text("/package/name"), text("/package/version"))),
        "ports" => {
            ("port", "network", format!("{}/{}", text("/network/protocol"), v["source"]["port"].as_u64().unwrap_or(0)))
        }
        "networks" => {
            ("network", "network", format!("{} {}", text("/observer/ingress/interface/name"), text("/host/ip/0")))
        }
        "processes" => ("process", "process", format!("{} ({})", text("/process/name"), text("/process/pid"))),
        "hardware" => ("hardware", "host", "hardware".into()),
        _ => ("system", "host", v["host"]["os"]["name"].as_str().unwrap_or("system").to_string()),
    }
}

fn notification(doc: &Stored, category: &str, action: &str, kind: &str, reason: String, now: &str) -> Event {
    // Bounded again: a removal carries the old document, maybe saved before documents were bounded.
    let mut data: Value = serde_json::from_str(&bounded(doc.doc.clone(), MAX_DOC_BYTES)).unwrap_or(Value::Null);
    if let Some(o) = data.as_object_mut() {
        let event = json!({"action": action, "category": [category], "type": [kind], "created": now, "reason": reason});
        o.insert("event".into(), event);
    }
    let header = json!({"collector": doc.collector, "module": "inventory"}).to_string();
    Event::new(Kind::Stateless, &header, Some(&data.to_string()))
}

/// Stateless change notifications (pure): one per change, except that a package whose version
/// alone changes (delete of the old id, create of the new) is ONE `package-updated`, at the create.
pub fn notifications(changes: &[Change], now: &str) -> Vec<Event> {
    let field = |s: &Stored, f: &str| s.value()["package"][f].as_str().unwrap_or("").to_string();
    let pkg_key = |s: &Stored| (s.collector == "packages").then(|| (field(s, "name"), field(s, "architecture")));
    let version = |s: &Stored| s.value()["package"]["version"].as_str().unwrap_or("?").to_string();
    let (mut removed, mut created) = (HashMap::new(), Vec::new());
    for c in changes {
        match c {
            Change::Delete { old, .. } => removed.extend(pkg_key(old).map(|k| (k, old))),
            Change::Create { new, .. } => created.extend(pkg_key(new)),
            Change::Update { .. } => {}
        }
    }
    // `<noun>-detected` and the like; the nouns are ASCII, so the first byte is a character.
    let generic = |s: &Stored, past: &str, kind: &str| {
        let (n, category, what) = describe(s);
        let reason = format!("{}{} {what} was {past}", n[..1].to_uppercase(), &n[1..]);
        notification(s, category, &format!("{n}-{past}"), kind, reason, now)
    };
    let (mut out, mut deleted) = (Vec::new(), Vec::new());
    for c in changes {
        match c {
            Change::Create { new, .. } if new.collector == "packages" => {
                let (action, kind, reason) = match pkg_key(new).and_then(|k| removed.get(&k)) {
                    Some(old) => {
                        let (name, from, to) = (field(new, "name"), version(old), version(new));
                        ("package-updated", "change", format!("Package {name} was updated from {from} to {to}"))
                    }
                    None => ("package-installed", "installation", format!("Package {} was installed", describe(new).2)),
                };
                out.push(notification(new, "package", action, kind, reason, now));
            }
            Change::Create { new, .. } => out.push(generic(new, "detected", "creation")),
            Change::Update { new, .. } => out.push(generic(new, "updated", "change")),
            Change::Delete { old, .. } if pkg_key(old).is_some_and(|k| created.contains(&k)) => {}
            Change::Delete { old, .. } => deleted.push(generic(old, "removed", "deletion")),
        }
    }
    out.extend(deleted);
    out
}

/// Every string cut to at most `limit` characters, every array to `limit` elements.
fn cut(v: &Value, limit: usize) -> Value {
    match v {
        Value::String(s) => Value::String(s.chars().take(limit).collect()),
        Value::Array(a) => a.iter().take(limit).map(|x| cut(x, limit)).collect(),
        Value::Object(o) => o.iter().map(|(k, x)| (k.clone(), cut(x, limit))).collect(),
        other => other.clone(),
    }
}

/// The document within `max` bytes (pure; docs/events.md, Documents): a longer one gets its strings and arrays cut
/// to the largest common bound that fits, and `"tags":["truncated"]` (bound 0 fits collectors' objects; else the tag).
pub fn bounded(doc: String, max: usize) -> String {
    if doc.len() <= max {
        return doc;
    }
    // Collectors build objects with `json!`; anything else would be `{}`: `c["tags"]` cannot panic.
    let v = serde_json::from_str(&doc).ok().filter(Value::is_object).unwrap_or_else(|| json!({}));
    let at = |limit| {
        let mut c = cut(&v, limit);
        c["tags"] = json!(["truncated"]);
        Some(c.to_string()).filter(|d| d.len() <= max)
    };
    // The size only grows with the limit: binary search for the largest that fits.
    let (mut fits, mut over) = (0, max + 1);
    while over - fits > 1 {
        let mid = (fits + over) / 2;
        if at(mid).is_some() { fits = mid } else { over = mid }
    }
    at(fits).unwrap_or_else(|| r#"{"tags":["truncated"]}"#.into())
}

/// Runs the enabled collectors: the documents found, by id, and the failed collectors, with why.
pub fn scan(root: &Path, enabled: &[String], uuid: &str) -> (Docs, Vec<(String, Unreadable)>) {
    let (mut docs, mut failed) = (BTreeMap::new(), Vec::new());
    for c in enabled {
        let found: Result<Vec<Doc>, Unreadable> = match c.as_str() {
            "system" => collectors::collect_system(root),
            "hardware" => collectors::collect_hardware(root),
            "packages" => collectors::collect_packages(root),
            "networks" => collectors::collect_networks(root),
            "ports" => collectors::collect_ports(root),
            "processes" => collectors::collect_processes(root),
            _ => continue,
        };
        match found {
            Ok(found) => docs.extend(found.into_iter().map(|Doc { key, doc }| {
                (doc_id(uuid, &key), Stored { collector: c.clone(), doc: bounded(doc, MAX_DOC_BYTES) })
            })),
            Err(e) => failed.push((c.clone(), e)),
        }
    }
    (docs, failed)
}

/// Why a scan was not delivered (it is repeated at the next interval).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// A sink did not take the events: the thread is told to stop, or the pipeline is gone.
    #[error("{0}; the scan is repeated next time")]
    Sink(SinkError),
    /// The queue refused the stateful events (full, or a disk error), or the snapshot could not be written.
    #[error("{0}; the scan is repeated next time")]
    Failed(String),
    /// The saved snapshot is not what the module writes (named in the message): a fresh full scan replaces it.
    #[error("{0}; it is replaced by a fresh full scan")]
    Corrupt(String),
}

/// Hands `changes` to the queue (durable) and then `notes` to the pipeline, as every scanning module does before its
/// snapshot moves: a failure leaves the snapshot where it was, so the same changes are found and sent again.
pub fn deliver(ctx: &Context, module: &str, changes: &[Change], notes: Vec<Event>, now: &str) -> Result<(), ScanError> {
    for chunk in stateful_events(changes, now, module).chunks(APPEND_CHUNK) {
        let r = ctx.durable.append(chunk.to_vec()).map_err(ScanError::Sink)?;
        if !r.all_stored(chunk.len()) {
            let why = r.error.map(|e| e.to_string()).unwrap_or_default();
            return Err(ScanError::Failed(format!("{module} changes not queued ({why})")));
        }
        Stats::add(&ctx.stats.received, chunk.len() as u64);
    }
    Stats::add(&ctx.stats.received, notes.len() as u64);
    notes.chunks(512).try_for_each(|chunk| ctx.events.send(chunk.to_vec()).map_err(ScanError::Sink))
}

/// One scan and its delivery. Returns a line for the log.
fn scan_once(config: &InventoryConfig, ctx: &Context) -> Result<String, ScanError> {
    let started = std::time::Instant::now();
    let saved = std::fs::read(&ctx.state).ok().and_then(|b| serde_json::from_slice::<Snapshot>(&b).ok());
    // A new registration is a new agent on the server: resync everything.
    let previous = saved.filter(|s| s.uuid == ctx.uuid);
    let first = previous.is_none();
    let old = previous.map(|s| s.docs).unwrap_or_default();
    let (found, failed) = scan(&config.root, &config.collectors, &ctx.uuid);
    let scan_ms = started.elapsed().as_millis();
    for (collector, e) in &failed {
        let line = format!("inventory: {collector}: {e}; its previous documents are kept");
        log::warn!("{line}");
        ctx.stats.set_error(line);
    }
    let new = merge(&old, found, &failed.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>());
    let changes = diff(&old, &new);
    let now = status::rfc3339(SystemTime::now());
    deliver(ctx, "inventory", &changes, if first { Vec::new() } else { notifications(&changes, &now) }, &now)?;
    // Durable events first, snapshot second: a crash in between means a resend.
    let snapshot = Snapshot { uuid: ctx.uuid.clone(), docs: new };
    let save = |e: io::Error| ScanError::Failed(format!("cannot save {}: {e}", ctx.state.display()));
    let json = serde_json::to_vec(&snapshot).map_err(|e| save(e.into()))?;
    crate::fsutil::write_atomic(&ctx.state, &json, 0o600).map_err(save)?;
    let count = |k: fn(&Change) -> bool| changes.iter().filter(|c| k(c)).count();
    Ok(format!(
        "inventory: {} documents (scan {scan_ms} ms); {} created, {} updated, {} deleted{}",
        snapshot.docs.len(),
        count(|c| matches!(c, Change::Create { .. })),
        count(|c| matches!(c, Change::Update { .. })),
        count(|c| matches!(c, Change::Delete { .. })),
        if first { " (first scan: no notifications)" } else { "" }
    ))
}

fn run(config: Config, ctx: Context) {
    // Scans are background work on a small host (best effort: at normal priority they still work).
    let _ = crate::sys::set_thread_nice(10);
    loop {
        match scan_once(&config.inventory, &ctx) {
            Ok(line) => log::info!("{line}"),
            Err(ScanError::Sink(SinkError::Stopped)) => break,
            Err(e) => log::warn!("{e}"),
        }
        // A scan allocates and frees a lot at once; give it back to the system until the next.
        crate::memory::release_free();
        select! {
            recv(ctx.stop) -> _ => break,
            default(config.inventory.interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(name: &str, version: &str) -> (String, Stored) {
        let doc =
            json!({"package": {"name": name, "version": version, "architecture": "amd64", "type": "deb"}}).to_string();
        (doc_id("u", &format!("{name}:{version}:amd64:deb:")), Stored { collector: "packages".into(), doc })
    }

    fn map(items: Vec<(String, Stored)>) -> BTreeMap<String, Stored> {
        items.into_iter().collect()
    }

    #[test]
    fn timestamps_go_first() {
        assert_eq!(stamped(r#"{"a":1}"#, "T"), r#"{"@timestamp":"T","a":1}"#);
        assert_eq!(stamped("{}", "T"), r#"{"@timestamp":"T"}"#);
    }

    #[test]
    fn ids_are_sha1_of_uuid_and_key() {
        // sha1("u:openssl:3:amd64:deb:")
        let id = doc_id("u", "openssl:3:amd64:deb:");
        assert_eq!(id.len(), 40);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(doc_id("abc", ""), sha1_smol::Sha1::from("abc:").digest().to_string());
    }

    #[test]
    fn diff_table() {
        let old = map(vec![pkg("a", "1"), pkg("b", "1"), pkg("c", "1")]);
        let new = map(vec![pkg("a", "1"), pkg("b", "2"), pkg("d", "1")]);
        let changes = diff(&old, &new);
        let kinds: Vec<String> = changes
            .iter()
            .map(|c| match c {
                Change::Create { new, .. } => format!("create {}", describe(new).2),
                Change::Update { new, .. } => format!("update {}", describe(new).2),
                Change::Delete { old, .. } => format!("delete {}", describe(old).2),
            })
            .collect();
        let mut sorted = kinds.clone();
        sorted.sort();
        assert_eq!(sorted, vec!["create b (2)", "create d (1)", "delete b (1)", "delete c (1)"]);

        // A collector that is switched off (or found nothing) loses its documents.
        assert_eq!(diff(&old, &BTreeMap::new()).len(), 3);
    }

    #[test]
    fn a_failed_collector_keeps_its_documents() {
        let hw = Stored { collector: "hardware".into(), doc: r#"{"host":{}}"#.into() };
        let old = map(vec![pkg("a", "1"), pkg("b", "1"), ("h".into(), hw.clone())]);
        // packages failed; hardware ran and changed.
        let hw2 = Stored { collector: "hardware".into(), doc: r#"{"host":{"cpu":{}}}"#.into() };
        let new = merge(&old, map(vec![("h".into(), hw2.clone())]), &["packages"]);
        assert_eq!(new, map(vec![pkg("a", "1"), pkg("b", "1"), ("h".into(), hw2.clone())]));
        assert_eq!(diff(&old, &new), vec![Change::Update { id: "h".into(), old: old["h"].clone(), new: hw2 }]);
        assert!(notifications(&diff(&old, &merge(&old, BTreeMap::new(), &["packages", "hardware"])), "T").is_empty());
    }

    #[test]
    fn an_unreadable_package_database_fails_the_collector_and_no_database_is_no_packages() {
        let root = tempfile::tempdir().unwrap();
        let status = root.path().join("var/lib/dpkg/status");
        let packages = || scan(root.path(), &["packages".into()], "u");
        let (docs, failed) = packages();
        assert!(docs.is_empty() && failed.is_empty(), "no dpkg at all: no packages");
        std::fs::create_dir_all(&status).unwrap();
        for why in ["a directory", "missing"] {
            let (docs, failed) = packages();
            assert!(docs.is_empty(), "{why}");
            let [(collector, e)] = &failed[..] else { panic!("{why}: {failed:?}") };
            assert_eq!(collector, "packages");
            assert!(e.to_string().starts_with(&format!("cannot read {}: ", status.display())), "{why}: {e}");
            std::fs::remove_dir(&status).unwrap_or_default();
        }
        std::fs::write(&status, "Package: a\nStatus: install ok installed\nVersion: 1\n").unwrap();
        let (docs, failed) = packages();
        assert_eq!((docs.len(), failed.len()), (1, 0));
    }

    #[test]
    fn volatile_counters_do_not_make_updates() {
        let hw = |free: u64, cores: u64| {
            Stored {
            collector: "hardware".into(),
            doc: json!({"host": {"cpu": {"cores": cores}, "memory": {"free": free, "total": 100, "used": {"percentage": 100 - free}}}})
                .to_string(),
        }
        };
        let old = map(vec![("h".into(), hw(10, 2))]);
        assert!(diff(&old, &map(vec![("h".into(), hw(55, 2))])).is_empty());
        assert_eq!(diff(&old, &map(vec![("h".into(), hw(10, 4))])).len(), 1);
    }

    #[test]
    fn a_version_change_is_one_package_updated_notification() {
        let old = map(vec![pkg("openssl", "3.0.13-1"), pkg("gone", "1")]);
        let new = map(vec![pkg("openssl", "3.0.14-1"), pkg("fresh", "2")]);
        let changes = diff(&old, &new);
        let stateful = stateful_events(&changes, "T", "inventory");
        assert_eq!(stateful.len(), 4, "two deletes and two creates on the stateful side");
        let notes = notifications(&changes, "T");
        let mut actions: Vec<(String, String)> = notes
            .iter()
            .map(|e| {
                let d: Value = serde_json::from_str(e.data().unwrap()).unwrap();
                (d["event"]["action"].as_str().unwrap().to_string(), d["event"]["reason"].as_str().unwrap().to_string())
            })
            .collect();
        actions.sort();
        assert_eq!(
            actions,
            vec![
                ("package-installed".into(), "Package fresh (2) was installed".into()),
                ("package-removed".into(), "Package gone (1) was removed".into()),
                ("package-updated".into(), "Package openssl was updated from 3.0.13-1 to 3.0.14-1".into()),
            ]
        );
        let installed = notes.iter().find(|e| e.data().unwrap().contains("package-installed")).unwrap();
        let d: Value = serde_json::from_str(installed.data().unwrap()).unwrap();
        assert_eq!(d["event"]["category"], json!(["package"]));
        assert_eq!(d["event"]["type"], json!(["installation"]));
        assert_eq!(d["package"]["name"], "fresh");
        assert_eq!(installed.header(), r#"{"collector":"packages","module":"inventory"}"#);
    }

    fn process(args: &[String]) -> String {
        json!({"process": {"args": args, "command_line": args.join(" "), "name": "sh", "pid": "7"}}).to_string()
    }

    #[test]
    fn documents_too_large_are_cut_to_fit_and_marked() {
        let args = |n: usize, arg: &str| vec![arg.to_string(); n];
        let table: Vec<(&str, String, usize)> = vec![
            ("one huge argument", process(&args(1, &"a".repeat(5000))), 1000),
            ("many tiny arguments", process(&args(5000, "x")), 1000),
            ("multi-byte characters", process(&args(3, &"é".repeat(2000))), 1001),
            ("control characters (escaped 6 times longer)", process(&args(2, &"\u{1}".repeat(3000))), 1000),
            ("at the bound: untouched", process(&args(1, &"a".repeat(50))), 165),
            ("one byte over the bound", process(&args(1, &"a".repeat(50))), 164),
        ];
        for (what, doc, max) in table {
            let out = bounded(doc.clone(), max);
            assert!(out.len() <= max, "{what}: {} bytes", out.len());
            if doc.len() <= max {
                assert_eq!(out, doc, "{what}");
                continue;
            }
            let (v, orig): (Value, Value) = (serde_json::from_str(&out).unwrap(), serde_json::from_str(&doc).unwrap());
            assert_eq!(v["tags"], json!(["truncated"]), "{what}");
            // Fields other than the long ones are kept; the long ones are prefixes of what they were.
            assert_eq!(
                (&v["process"]["name"], &v["process"]["pid"]),
                (&orig["process"]["name"], &orig["process"]["pid"])
            );
            let line = v["process"]["command_line"].as_str().unwrap();
            assert!(orig["process"]["command_line"].as_str().unwrap().starts_with(line), "{what}");
            assert!(out.len() > max * 3 / 4, "{what}: no more is cut than needed: {out}");
            let (got, had) = (v["process"]["args"].as_array().unwrap(), orig["process"]["args"].as_array().unwrap());
            assert!(
                got.len() <= had.len()
                    && got.iter().zip(had).all(|(g, h)| h.as_str().unwrap().starts_with(g.as_str().unwrap()))
            );
            assert_eq!(bounded(doc, max), out, "{what}: the same document is cut the same way (no spurious update)");
        }
    }

    /// Measured: a `processes` document of 20.6 MB was acknowledged and never sent.
    #[test]
    fn every_event_of_a_huge_document_fits_a_record() {
        let doc = bounded(process(&["\u{1}".repeat(1 << 20), "b".repeat(1 << 20)]), MAX_DOC_BYTES);
        assert!(doc.contains(r#""tags":["truncated"]"#));
        let s = Stored { collector: "processes".into(), doc };
        let (a, b) = (Stored { doc: s.doc.replace("\"sh\"", "\"bash\""), ..s.clone() }, s.clone());
        let changes = [
            Change::Create { id: "1".into(), new: s },
            Change::Update { id: "2".into(), old: a.clone(), new: a },
            Change::Delete { id: "3".into(), old: b },
        ];
        let events = [stateful_events(&changes, "T", "inventory"), notifications(&changes, "T")].concat();
        assert_eq!(events.len(), 6);
        assert!(events.iter().all(|e| e.lines().len() <= crate::event::MAX_RECORD_BYTES));
    }

    #[test]
    fn stateful_event_shapes_pass_the_ingest_rules() {
        let (id, s) = pkg("a", "1");
        let changes = vec![Change::Create { id: id.clone(), new: s.clone() }, Change::Delete { id, old: s }];
        for e in stateful_events(&changes, "2026-11-26T15:00:00.000Z", "inventory") {
            let line = match e.data() {
                Some(d) => format!(r#"{{"header":{},"data":{}}}"#, e.header(), d),
                None => format!(r#"{{"header":{}}}"#, e.header()),
            };
            assert_eq!(crate::event::parse_line(line.as_bytes()).unwrap().unwrap(), e);
        }
    }
}
