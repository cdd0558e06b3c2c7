//! Server group configuration: `<data_dir>/shared/<group>.yml`, replaced as a set.
//!
//! `shared` is a symbolic link to a generation directory `shared.<n>/` holding the group
//! files and `.groups.json` (the ordered group list). A new set is written to a fresh
//! generation, fsynced, and switched to with one `rename` of a new link over `shared`, so
//! readers (and a crash) see either the old set or the new one, never a mix.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use crate::config::{self, Config, ConfigError};

const LIST_FILE: &str = ".groups.json";

/// Why the group set could not be read, written or applied.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// A group file is not a YAML mapping (the file is named).
    #[error("group file {file} is not a YAML mapping: {message}")]
    NotAMapping { file: String, message: String },
    /// The merged configuration is invalid.
    #[error("{0}")]
    Config(#[source] ConfigError),
    /// A file or directory operation failed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> GroupError + '_ {
    move |source| GroupError::Io { path: path.to_path_buf(), source }
}

pub fn shared_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("shared")
}

/// The current group list (empty when none was ever set).
pub fn current(data_dir: &Path) -> Vec<String> {
    crate::fsutil::read_nofollow(&shared_dir(data_dir).join(LIST_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<String>>(&b).ok())
        .unwrap_or_default()
}

fn yaml_to_toml(y: &Yaml) -> Option<toml::Value> {
    Some(match y {
        Yaml::String(s) => toml::Value::String(s.clone()),
        Yaml::Integer(i) => toml::Value::Integer(*i),
        Yaml::Boolean(b) => toml::Value::Boolean(*b),
        Yaml::Real(r) => toml::Value::Float(r.parse().ok()?),
        Yaml::Array(a) => toml::Value::Array(a.iter().filter_map(yaml_to_toml).collect()),
        Yaml::Hash(h) => {
            let mut t = toml::Table::new();
            for (k, v) in h {
                if let (Some(k), Some(v)) = (k.as_str(), yaml_to_toml(v)) {
                    t.insert(k.to_string(), v);
                }
            }
            toml::Value::Table(t)
        }
        Yaml::Null | Yaml::Alias(_) | Yaml::BadValue => return None,
    })
}

/// Parses one group file into an overlay of the keys a server may set. Returns the overlay
/// and the `section.key` names it ignored: keys this agent does not have, and local-only
/// keys (identity, paths, TLS, ...), which only the local file may set.
pub fn parse_group_file(file: &str, text: &str) -> Result<(toml::Table, Vec<String>), GroupError> {
    let docs = YamlLoader::load_from_str(text)
        .map_err(|e| GroupError::NotAMapping { file: file.to_string(), message: e.to_string() })?;
    let mut overlay = toml::Table::new();
    let mut ignored = Vec::new();
    let root = match docs.into_iter().next() {
        None | Some(Yaml::Null) => return Ok((overlay, ignored)),
        Some(Yaml::Hash(h)) => h,
        Some(_) => {
            return Err(GroupError::NotAMapping {
                file: file.to_string(),
                message: "the document is not a mapping".into(),
            });
        }
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
                (Some(_), Some(val)) => {
                    t.insert(name.to_string(), val);
                }
                _ => ignored.push(format!("{section}.{name}")),
            }
        }
        overlay.insert(section.to_string(), toml::Value::Table(t));
    }
    Ok((overlay, ignored))
}

/// Overlays from the current set, in group order (missing files are skipped with a warning).
pub fn current_overlays(data_dir: &Path) -> Result<Vec<(String, toml::Table)>, GroupError> {
    let dir = shared_dir(data_dir);
    let (mut out, mut ignored) = (Vec::new(), Vec::new());
    for g in current(data_dir) {
        let file = format!("{g}.yml");
        let text = match crate::fsutil::read_nofollow(&dir.join(&file))
            .and_then(|b| String::from_utf8(b).map_err(io::Error::other))
        {
            Ok(t) => t,
            Err(e) => {
                log::warn!("group file {} is unreadable ({e}); ignored", dir.join(&file).display());
                continue;
            }
        };
        let (overlay, skipped) = parse_group_file(&file, &text)?;
        ignored.extend(skipped.into_iter().map(|k| format!("{k} ({file})")));
        out.push((file, overlay));
    }
    warn_ignored(&ignored);
    Ok(out)
}

/// One warning naming every setting the group files carry that this agent did not apply.
pub fn warn_ignored(ignored: &[String]) {
    if !ignored.is_empty() {
        log::warn!("group files: ignored {} (unknown here, or local-only settings)", ignored.join(", "));
    }
}

/// The effective configuration: the local file (re-read from `local`) plus the current
/// group files. Used at start, on SIGHUP and after `set-group`/`fetch-config`.
pub fn effective_config(local: &Config, data_dir: &Path) -> Result<Config, GroupError> {
    let text = local.source.as_ref().map(|p| fs::read_to_string(p).map_err(io_err(p))).transpose()?;
    let text = text.unwrap_or_default();
    let overlays = current_overlays(data_dir)?;
    Config::with_overlays(&text, local.source.as_deref(), &overlays).map_err(GroupError::Config)
}

fn next_generation(data_dir: &Path) -> u64 {
    let entries = fs::read_dir(data_dir).into_iter().flatten().flatten();
    entries.filter_map(|e| e.file_name().to_str()?.strip_prefix("shared.")?.parse::<u64>().ok()).max().unwrap_or(0) + 1
}

/// Replaces the whole set with `files` (`(group, content)`, in group order), atomically.
pub fn install(data_dir: &Path, files: &[(String, Vec<u8>)]) -> Result<(), GroupError> {
    let generation = next_generation(data_dir);
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
        let link = shared_dir(data_dir);
        let tmp = data_dir.join(".shared.tmp");
        let _ = fs::remove_file(&tmp);
        symlink(format!("shared.{generation}"), &tmp).map_err(io_err(&tmp))?;
        if fs::read_link(&link).is_err() && link.is_dir() {
            // A real directory from elsewhere: move it aside (once) so the link can take its place.
            let aside = data_dir.join("shared.legacy");
            let _ = fs::remove_dir_all(&aside);
            fs::rename(&link, &aside).map_err(io_err(&link))?;
        }
        fs::rename(&tmp, &link).map_err(io_err(&link))?;
        // The switch is durable only once the directory entry is.
        fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(io_err(data_dir))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&gen_dir);
        return result;
    }
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

    #[test]
    fn yaml_overlay_keeps_known_keys_only() {
        let text = "events:\n  batch_interval: 5s\n  buffer_events: 500\n  mystery: 1\nlogcollector:\n  files: [/var/log/a.log]\nwodle:\n  x: 1\nlog:\n  level: debug\n";
        let (overlay, ignored) = parse_group_file("g1.yml", text).unwrap();
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
        let (overlay, ignored) = parse_group_file("g.yml", text).unwrap();
        assert_eq!(ignored, vec!["server.verify", "agent.run_dir", "log.file"]);
        let c = Config::with_overlays("", None, &[("g.yml".into(), overlay)]).unwrap();
        assert_eq!((c.server.verify, c.log.level), (crate::config::Verify::Full, log::LevelFilter::Debug));
        assert_eq!(c.agent.run_dir, Config::defaults().agent.run_dir);
    }

    #[test]
    fn non_mappings_are_refused() {
        for bad in ["- a\n- b\n", "just text", "a: [unclosed"] {
            assert!(parse_group_file("x.yml", bad).is_err(), "{bad:?}");
        }
        assert!(parse_group_file("empty.yml", "").unwrap().0.is_empty());
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
