//! Server group configuration: `<data_dir>/shared/<group>.yml`, replaced as a set (ARCHITECTURE.md,
//! Invariants): `shared` links to a generation `shared.<n>/` holding the files and `.groups.json`
//! (the ordered group list), switched by one `rename` of a new link.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::{Yaml, YamlLoader};

use crate::config::{self, Config, ConfigError};

const LIST_FILE: &str = ".groups.json";
/// Limits on what a server sends (SPEC §2.1), and a nesting bound: loading recurses per level.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
pub const MAX_GROUPS: usize = 64;
const MAX_NODES: usize = 10_000;
/// Scalar bytes, aliases expanded: 4 times a file's limit, room to reuse anchors while a load stays a few MiB.
const MAX_EXPANDED_BYTES: usize = 4 << 20;
const MAX_DEPTH: usize = 64;

/// Why the group set could not be read, written or applied.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// A group file is not a YAML mapping, or goes past a limit (the file and limit are named).
    #[error("group file {file} {message}")]
    Refused { file: String, message: String },
    /// The merged configuration is invalid.
    #[error("{0}")]
    Config(#[source] ConfigError),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> GroupError + '_ {
    move |source| GroupError::Io { path: path.to_path_buf(), source }
}

pub fn shared_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("shared")
}

/// Reads `name` in the current generation. agent.user owns data_dir and may replace the `shared` link: it is read,
/// never followed, and must name a `shared.<n>` beside it (a real directory, from before generations, is read as is).
fn read_current(data_dir: &Path, name: &str) -> io::Result<Vec<u8>> {
    let shared = shared_dir(data_dir);
    let dir = match fs::read_link(&shared).map(|t| t.to_str().map(str::to_owned)) {
        Err(_) => crate::fsutil::handle(&shared)?,
        Ok(Some(t)) if t.strip_prefix("shared.").is_some_and(|n| n.parse::<u64>().is_ok()) => {
            crate::fsutil::handle(&data_dir.join(t))?
        }
        Ok(_) => return Err(io::Error::other(format!("{} links outside its generations", shared.display()))),
    };
    crate::fsutil::read_at(&crate::fsutil::fd_path(&dir).join(name), &shared.join(name))
}

/// The current group list (empty when none was ever set, or when `shared` links elsewhere).
pub fn current(data_dir: &Path) -> Vec<String> {
    let list = read_current(data_dir, LIST_FILE).ok();
    list.and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

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

/// One warning naming every setting the group files carry that is not applied; `; ignored …` for a result, or "".
pub fn report_ignored(ignored: &[String]) -> String {
    if ignored.is_empty() {
        return String::new();
    }
    log::warn!("group files: ignored {} (unknown here, or local-only settings)", ignored.join(", "));
    format!("; ignored {}", ignored.join(", "))
}

/// The local file (re-read) with `files` (`(group, content)`, in order) over it, and what they set that is not applied.
pub fn merge(local: &Config, files: &[(String, Vec<u8>)]) -> Result<(Config, Vec<String>), GroupError> {
    let (mut overlays, mut ignored) = (Vec::with_capacity(files.len()), Vec::new());
    for (g, content) in files {
        let file = format!("{g}.yml");
        let (overlay, skipped) = parse_group_file(&file, content)?;
        ignored.extend(skipped.into_iter().map(|k| format!("{k} ({file})")));
        overlays.push((file, overlay));
    }
    let text = local.source.as_ref().map(|p| fs::read_to_string(p).map_err(io_err(p))).transpose()?;
    let config = Config::with_overlays(&text.unwrap_or_default(), local.source.as_deref(), &overlays);
    Ok((config.map_err(GroupError::Config)?, ignored))
}

/// The local file plus the current group files, as a set (one unreadable file is an error); at start and on SIGHUP.
pub fn effective_config(local: &Config, data_dir: &Path) -> Result<Config, GroupError> {
    if !local.agent.remote_config {
        log::info!("agent.remote_config = false: the server's group files are not applied");
        return Ok(local.clone());
    }
    let dir = shared_dir(data_dir);
    // As the server's are (the list and files may be agent.user's since a run): at most MAX_GROUPS of MAX_FILE_BYTES.
    let read = |g: String| {
        let content = read_current(data_dir, &format!("{g}.yml"))?;
        let big = io::Error::other(format!("{g}.yml is over {MAX_FILE_BYTES} bytes; refusing it"));
        (content.len() as u64 <= MAX_FILE_BYTES).then_some((g, content)).ok_or(big)
    };
    let files = current(data_dir).into_iter().take(MAX_GROUPS).map(read).collect::<io::Result<Vec<_>>>();
    let files = files.map_err(io_err(&dir))?;
    let (config, ignored) = merge(local, &files)?;
    report_ignored(&ignored);
    Ok(config)
}

/// Replaces the whole set with `files` (`(group, content)`, in group order), atomically.
pub fn install(data_dir: &Path, files: &[(String, Vec<u8>)]) -> Result<(), GroupError> {
    // The same set again (a repeated command): nothing to write, the flash is spared.
    let dir = shared_dir(data_dir);
    let same =
        |(g, content): &(String, Vec<u8>)| read_current(data_dir, &format!("{g}.yml")).is_ok_and(|c| c == *content);
    if current(data_dir).iter().eq(files.iter().map(|(g, _)| g))
        && files.iter().all(same)
        && fs::read_link(&dir).is_ok()
    {
        return Ok(());
    }
    let entries = fs::read_dir(data_dir).into_iter().flatten().flatten();
    let generation = entries.filter_map(|e| e.file_name().to_str()?.strip_prefix("shared.")?.parse::<u64>().ok());
    let generation = generation.max().unwrap_or(0) + 1;
    let gen_dir = data_dir.join(format!("shared.{generation}"));
    fs::create_dir(&gen_dir).map_err(io_err(&gen_dir))?;
    let result = (|| {
        for (group, content) in files {
            let path = gen_dir.join(format!("{group}.yml"));
            crate::fsutil::write_atomic(&path, content, 0o600).map_err(io_err(&path))?;
        }
        let names: Vec<&String> = files.iter().map(|(g, _)| g).collect();
        let list = serde_json::to_vec(&names).map_err(io::Error::other).map_err(io_err(&gen_dir))?;
        let list_path = gen_dir.join(LIST_FILE);
        crate::fsutil::write_atomic(&list_path, &list, 0o600).map_err(io_err(&list_path))?;
        // Switch: a new link renamed over the old one is atomic.
        let tmp = data_dir.join(".shared.tmp");
        let _ = fs::remove_file(&tmp);
        symlink(format!("shared.{generation}"), &tmp).map_err(io_err(&tmp))?;
        if fs::read_link(&dir).is_err() && dir.is_dir() {
            // A real directory from elsewhere: move it aside (once) so the link can take its place.
            let aside = data_dir.join("shared.legacy");
            let _ = fs::remove_dir_all(&aside);
            fs::rename(&dir, &aside).map_err(io_err(&dir))?;
        }
        fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
        // The switch is durable only once the directory entry is.
        fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(io_err(data_dir))
    })();
    result.inspect_err(|_| _ = fs::remove_dir_all(&gen_dir))?;
    // Old generations (and `shared.legacy`) are garbage now.
    for e in fs::read_dir(data_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("shared.") && name != format!("shared.{generation}") {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
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

    /// The issue's 591-byte file: nine levels of ten aliases each, 10^9 strings once expanded.
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

    #[test]
    fn remote_config_false_applies_no_group_file() {
        let dir = tempfile::tempdir().unwrap();
        install(dir.path(), &[("g1".into(), b"log:\n  level: trace\n".to_vec())]).unwrap();
        let local_file = dir.path().join("agent.toml");
        for (remote, level) in [("true", log::LevelFilter::Trace), ("false", log::LevelFilter::Warn)] {
            let text = format!("[agent]\nremote_config = {remote}\n[log]\nlevel = \"warn\"\n");
            fs::write(&local_file, &text).unwrap();
            let local = Config::load(Some(&local_file)).unwrap();
            assert_eq!(effective_config(&local, dir.path()).unwrap().log.level, level, "remote_config = {remote}");
            // The same for the merge after set-group, which re-reads the local file.
            let files = [("g1".into(), b"log:\n  level: trace\n".to_vec())];
            assert_eq!(merge(&local, &files).unwrap().0.log.level, level);
        }
    }

    #[test]
    fn install_switches_the_whole_set() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(current(d).is_empty());
        install(d, &[("g1".into(), b"a: 1\n".to_vec()), ("g2".into(), b"b: 2\n".to_vec())]).unwrap();
        assert_eq!(current(d), vec!["g1", "g2"]);
        assert_eq!(fs::read(shared_dir(d).join("g2.yml")).unwrap(), b"b: 2\n");
        install(d, &[("g3".into(), b"c: 3\n".to_vec())]).unwrap();
        assert_eq!(current(d), vec!["g3"]);
        assert!(!shared_dir(d).join("g1.yml").exists(), "the old set is gone as a whole");
        let gens = fs::read_dir(d)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("shared."))
            .count();
        assert_eq!(gens, 1);
        // The same set again writes nothing; another content does.
        let link = || fs::read_link(shared_dir(d)).unwrap();
        let before = link();
        install(d, &[("g3".into(), b"c: 3\n".to_vec())]).unwrap();
        assert_eq!(link(), before, "an identical set is not written again");
        install(d, &[("g3".into(), b"c: 4\n".to_vec())]).unwrap();
        assert_ne!(link(), before);
    }

    #[test]
    fn a_shared_link_pointing_outside_its_generations_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        install(d, &[("g1".into(), b"a: 1\n".to_vec())]).unwrap();
        assert_eq!(current(d), vec!["g1"]);
        // agent.user (data_dir is its) points `shared` at a set of its own elsewhere.
        let elsewhere = tempfile::tempdir().unwrap();
        fs::write(elsewhere.path().join(LIST_FILE), r#"["evil"]"#).unwrap();
        fs::write(elsewhere.path().join("evil.yml"), "a: 2\n").unwrap();
        for target in [elsewhere.path().to_path_buf(), PathBuf::from("../elsewhere"), PathBuf::from("shared.1/../x")] {
            fs::remove_file(shared_dir(d)).unwrap();
            symlink(&target, shared_dir(d)).unwrap();
            assert!(current(d).is_empty(), "{target:?}");
            let err = read_current(d, "evil.yml").unwrap_err().to_string();
            assert!(err.ends_with("shared links outside its generations"), "{err}");
        }
        // A generation swapped for a link is not followed either.
        let is_generation = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().starts_with("shared.");
        let generation = fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).find(is_generation).unwrap();
        fs::remove_file(shared_dir(d)).unwrap();
        symlink(generation.file_name().unwrap(), shared_dir(d)).unwrap();
        assert_eq!(current(d), vec!["g1"]);
        fs::rename(&generation, d.join("moved")).unwrap();
        symlink(elsewhere.path(), &generation).unwrap();
        assert!(current(d).is_empty(), "a linked generation is not followed");
    }

    #[test]
    fn a_real_shared_directory_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(shared_dir(dir.path())).unwrap();
        fs::write(shared_dir(dir.path()).join("old.yml"), "x: 1").unwrap();
        install(dir.path(), &[("g1".into(), b"a: 1\n".to_vec())]).unwrap();
        assert_eq!(current(dir.path()), vec!["g1"]);
        assert!(!shared_dir(dir.path()).join("old.yml").exists());
    }
}
