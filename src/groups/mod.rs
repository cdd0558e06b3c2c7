//! Server group configuration: `<data_dir>/shared/<group>.yml`, replaced as a set (ARCHITECTURE.md,
//! Invariants): `shared` links to a generation `shared.<n>/` holding the files and `.groups.json`
//! (the ordered group list), switched by one `rename` of a new link.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};

const LIST_FILE: &str = ".groups.json";
/// Limits on what a server sends (SPEC §2.1); the YAML ones are in `yaml`.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
pub const MAX_GROUPS: usize = 64;

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

#[cfg(feature = "groups")]
mod yaml;
#[cfg(feature = "groups")]
pub use yaml::parse_group_file;

/// Without the YAML reader (cargo feature "groups") every group file is refused: set-group and fetch-config say why.
#[cfg(not(feature = "groups"))]
pub fn parse_group_file(file: &str, _content: &[u8]) -> Result<(toml::Table, Vec<String>), GroupError> {
    let message = "cannot be applied: this build has no group configuration (cargo feature \"groups\")".into();
    Err(GroupError::Refused { file: file.to_string(), message })
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

    #[test]
    #[cfg(not(feature = "groups"))]
    fn without_the_feature_every_group_file_is_refused_naming_it() {
        let e = parse_group_file("g1.yml", b"log:\n  level: debug\n").unwrap_err().to_string();
        assert_eq!(
            e,
            "group file g1.yml cannot be applied: this build has no group configuration (cargo feature \"groups\")"
        );
    }

    #[test]
    #[cfg(feature = "groups")]
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
