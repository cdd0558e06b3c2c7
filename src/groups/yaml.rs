//! Group files (YAML) → configuration overlays of the keys a server may set, within the limits of SPEC §2.1.

use std::collections::HashMap;

use yaml_rust2::{Yaml, YamlLoader, parser::Event, parser::Parser};

use crate::{config, groups::GroupError};

/// Nodes, aliases expanded (SPEC §2.1), and a nesting bound: loading recurses per level.
const MAX_NODES: usize = 10_000;
/// Scalar bytes, aliases expanded: 4 times a file's limit, room to reuse anchors while a load stays a few MiB.
const MAX_EXPANDED_BYTES: usize = 4 << 20;
const MAX_DEPTH: usize = 64;

fn yaml_to_toml(y: &Yaml) -> Option<toml::Value> {
    Some(match y {
        Yaml::String(s) => toml::Value::String(s.clone()),
        Yaml::Integer(i) => toml::Value::Integer(*i),
        Yaml::Boolean(b) => toml::Value::Boolean(*b),
        Yaml::Real(r) => toml::Value::Float(r.parse().ok()?),
        Yaml::Array(a) => toml::Value::Array(a.iter().filter_map(yaml_to_toml).collect()),
        Yaml::Hash(h) => toml::Value::Table(
            h.iter().filter_map(|(k, v)| Some((k.as_str()?.to_string(), yaml_to_toml(v)?))).collect(),
        ),
        Yaml::Null | Yaml::Alias(_) | Yaml::BadValue => return None,
    })
}

/// Refuses YAML that, aliases expanded, has over [`MAX_NODES`] nodes or [`MAX_EXPANDED_BYTES`] of scalars, or
/// nests deeper than [`MAX_DEPTH`], before anything is built: the loader copies an alias's node (a string in full:
/// 200 KB aliased 2 500 times is 500 MB); counting parser events costs in proportion to the text.
fn check_nodes(text: &str) -> Result<(), String> {
    let mut parser = Parser::new_from_str(text);
    // Expanded (nodes, bytes) of anchored nodes (an open container counts 1 node, as loaded),
    // and the open containers with the totals at their start (each counts when it ends).
    let (mut nodes, mut bytes, mut sizes, mut open) = (0, 0, HashMap::new(), Vec::new());
    while nodes <= MAX_NODES && bytes <= MAX_EXPANDED_BYTES && open.len() <= MAX_DEPTH {
        let (n, b) = match parser.next_token().map_err(|e| format!("is not a YAML mapping: {e}"))?.0 {
            Event::StreamEnd => return Ok(()),
            Event::Alias(id) => sizes.get(&id).copied().unwrap_or((1, 0)),
            Event::Scalar(s, _, id, _) => *sizes.entry(id).insert_entry((1, s.len())).get(),
            Event::SequenceStart(id, _) | Event::MappingStart(id, _) => {
                open.push((id, nodes, bytes));
                (0, 0)
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (id, n, b) = open.pop().unwrap_or_default();
                sizes.insert(id, (nodes + 1 - n, bytes - b));
                (1, 0) // the container itself
            }
            _ => (0, 0),
        };
        (nodes, bytes) = (nodes + n, bytes + b);
    }
    Err(match (nodes > MAX_NODES, bytes > MAX_EXPANDED_BYTES) {
        (true, _) => format!("is refused: its aliases expand past the limit of {MAX_NODES} nodes"),
        (_, true) => format!("is refused: its aliases expand past the limit of {} MiB", MAX_EXPANDED_BYTES >> 20),
        _ => format!("is refused: it nests deeper than the limit of {MAX_DEPTH} levels"),
    })
}

/// One group file as an overlay of the keys a server may set, and the `section.key` names it ignored (unknown here,
/// or local-only: identity, paths, TLS, ...).
pub fn parse_group_file(file: &str, content: &[u8]) -> Result<(toml::Table, Vec<String>), GroupError> {
    let refused = |message| GroupError::Refused { file: file.to_string(), message };
    let text = std::str::from_utf8(content).map_err(|_| refused("is not UTF-8".into()))?;
    check_nodes(text).map_err(refused)?;
    let docs = YamlLoader::load_from_str(text).map_err(|e| refused(format!("is not a YAML mapping: {e}")))?;
    let (mut overlay, mut ignored) = (toml::Table::new(), Vec::new());
    let root = match docs.into_iter().next() {
        None | Some(Yaml::Null) => return Ok((overlay, ignored)),
        Some(Yaml::Hash(h)) => h,
        Some(_) => return Err(refused("is not a YAML mapping".into())),
    };
    for (k, v) in &root {
        let Some(section) = k.as_str() else { continue };
        let (Yaml::Hash(values), true) = (v, config::KEYS.iter().any(|k| k.section == section)) else {
            ignored.push(section.to_string());
            continue;
        };
        let mut t = toml::Table::new();
        for (k2, v2) in values {
            let Some(name) = k2.as_str() else { continue };
            match (config::key(section, name).filter(|k| k.server), yaml_to_toml(v2)) {
                (Some(_), Some(val)) => _ = t.insert(name.to_string(), val),
                _ => ignored.push(format!("{section}.{name}")),
            }
        }
        overlay.insert(section.to_string(), toml::Value::Table(t));
    }
    Ok((overlay, ignored))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::time::Duration;

    #[test]
    fn yaml_overlay_keeps_known_keys_only() {
        let text = "events:\n  batch_interval: 5s\n  buffer_events: 500\n  mystery: 1\nlogcollector:\n  files: [/var/log/a.log]\nwodle:\n  x: 1\nlog:\n  level: debug\n";
        let (overlay, ignored) = parse_group_file("g1.yml", text.as_bytes()).unwrap();
        assert_eq!(overlay["events"]["batch_interval"].as_str(), Some("5s"));
        assert_eq!(overlay["events"]["buffer_events"].as_integer(), Some(500));
        assert_eq!(overlay["logcollector"]["files"][0].as_str(), Some("/var/log/a.log"));
        assert_eq!(ignored, vec!["events.mystery", "wodle"]);
        let c = Config::with_overlays("", None, &[("g1.yml".into(), overlay)]).unwrap();
        assert_eq!(c.events.buffer_events, 500);
    }

    #[test]
    fn local_only_keys_are_ignored_and_reported() {
        let text = "server:\n  verify: none\nagent:\n  run_dir: /tmp/evil\n\
                    log:\n  level: debug\n  file: /tmp/x\n";
        let (overlay, ignored) = parse_group_file("g.yml", text.as_bytes()).unwrap();
        assert_eq!(ignored, vec!["server.verify", "agent.run_dir", "log.file"]);
        let c = Config::with_overlays("", None, &[("g.yml".into(), overlay)]).unwrap();
        assert_eq!((c.server.verify, c.log.level), (crate::config::Verify::Full, log::LevelFilter::Debug));
        assert_eq!(c.agent.run_dir, Config::defaults().agent.run_dir);
    }

    #[test]
    fn non_mappings_are_refused() {
        for bad in ["- a\n- b\n", "just text", "a: [unclosed"] {
            assert!(parse_group_file("x.yml", bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(parse_group_file("empty.yml", b"").unwrap().0.is_empty());
    }

    /// The 591-byte file: nine levels of ten aliases each, 10^9 strings once expanded.
    pub const BILLION_LAUGHS: &str = "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
";

    fn refusal(text: &str) -> String {
        parse_group_file("g.yml", text.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn aliases_are_counted_expanded_before_anything_is_built() {
        let e = refusal(BILLION_LAUGHS);
        assert_eq!(e, "group file g.yml is refused: its aliases expand past the limit of 10000 nodes");
        // The bound is exact: the root mapping, two keys, an anchored list of 97 scalars
        // (98 nodes) and a list of 101 aliases to it make 4 + 98 * 102 = 10 000 nodes.
        let items = vec!["x"; 97].join(", ");
        let aliases = vec!["*l"; 101].join(", ");
        let at_limit = format!("a: &l [{items}]\nb: [{aliases}]\n");
        assert!(parse_group_file("g.yml", at_limit.as_bytes()).is_ok());
        let past = format!("a: &l [{items}]\nb: [{aliases}, y]\n");
        assert!(refusal(&past).contains("past the limit of 10000 nodes"));
        // A long string aliased a few times counts its bytes per alias: 500 KB nine times is over.
        let text = |n: usize| format!("a: &s \"{}\"\nb: [{}]\n", "x".repeat(500_000), vec!["*s"; n].join(", "));
        assert!(parse_group_file("g.yml", text(7).as_bytes()).is_ok());
        let e = refusal(&text(8));
        assert_eq!(e, "group file g.yml is refused: its aliases expand past the limit of 4 MiB");
        // An anchored list of strings: its bytes come with it.
        let list = format!("a: &l [\"{}\", y]\nb: [*l, *l, *l, *l, *l, *l, *l, *l]\n", "x".repeat(500_000));
        assert!(refusal(&list).ends_with("limit of 4 MiB"));
    }

    #[test]
    fn deep_but_small_files_are_refused_without_recursing() {
        // Flow and block nesting, past the depth bound; loading these recursively would
        // need a frame per level. A thread with the command thread's stack shows none is used.
        let flow = format!("log: {}{}\n", "[".repeat(200), "]".repeat(200));
        let block = format!("log:\n  level:\n  {}x\n", "- ".repeat(100_000));
        let found = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || [refusal(&flow), refusal(&block)])
            .unwrap()
            .join()
            .unwrap();
        for e in found {
            assert!(e.ends_with("is refused: it nests deeper than the limit of 64 levels"), "{e}");
        }
        let ok = format!("log: {{level: debug}}\nwodle: {}{}\n", "[".repeat(60), "]".repeat(60));
        assert_eq!(parse_group_file("g.yml", ok.as_bytes()).unwrap().1, vec!["wodle"]);
    }

    #[test]
    fn a_file_with_a_few_aliases_loads_as_written() {
        let text = "defaults: &d\n  level: debug\nlog: *d\nevents:\n  batch_interval: &i 5s\nretry:\n  initial: *i\n";
        let (overlay, ignored) = parse_group_file("g.yml", text.as_bytes()).unwrap();
        assert_eq!(ignored, vec!["defaults"]);
        let c = Config::with_overlays("", None, &[("g.yml".into(), overlay)]).unwrap();
        assert_eq!(c.log.level, log::LevelFilter::Debug);
        assert_eq!((c.events.batch_interval, c.retry.initial), (Duration::from_secs(5), Duration::from_secs(5)));
    }
}
