//! The settings that can change while the agent runs: the effective configuration and the agent line.
//! One writer at a time (executor after `set-group`/`fetch-config`, supervisor on SIGHUP) replaces
//! the value and bumps a generation; readers refresh their [`View`] when it moved (one atomic load).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::{Config, KEYS};

pub struct Live {
    generation: AtomicU64,
    /// The current value, stamped with the generation it was published under.
    current: Mutex<View>,
    /// Serialises whole reload operations (read files, diff, swap): SIGHUP vs a command.
    reload: Mutex<()>,
}

/// What applying a new configuration did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Changed keys now in effect.
    pub live: Vec<String>,
    /// Changed keys that take effect at the next start.
    pub need_restart: Vec<String>,
}

impl Applied {
    pub fn describe(&self) -> String {
        let parts = [("applied", &self.live), ("restart the agent to apply", &self.need_restart)];
        let parts: Vec<String> =
            parts.iter().filter(|(_, k)| !k.is_empty()).map(|(what, k)| format!("{what} {}", k.join(", "))).collect();
        if parts.is_empty() { "no setting changed".to_string() } else { parts.join("; ") }
    }
}

/// A thread's cached copy.
#[derive(Clone)]
pub struct View {
    generation: u64,
    pub config: Arc<Config>,
    pub agent_line: Arc<str>,
}

impl Live {
    pub fn new(config: Config, agent_line: String) -> Arc<Live> {
        let view = View { generation: 1, config: Arc::new(config), agent_line: agent_line.into() };
        Arc::new(Live { generation: AtomicU64::new(1), current: Mutex::new(view), reload: Mutex::new(()) })
    }

    fn lock(&self) -> MutexGuard<'_, View> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn view(&self) -> View {
        self.lock().clone()
    }

    /// Refreshes `view` if something changed; returns whether it did.
    pub fn refresh(&self, view: &mut View) -> bool {
        if self.generation.load(Ordering::Acquire) == view.generation {
            return false;
        }
        *view = self.view();
        true
    }

    pub fn config(&self) -> Arc<Config> {
        self.lock().config.clone()
    }

    /// Holds other reloads off while one reads files and applies them.
    pub fn reload_guard(&self) -> MutexGuard<'_, ()> {
        self.reload.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the configuration; keys not marked live in [`KEYS`] keep their running values
    /// until a restart (reported, not applied). Threads re-read the live keys on change.
    pub fn apply(&self, new: Config) -> Applied {
        let mut current = self.lock();
        let mut merged = (*current.config).clone();
        let mut applied = Applied::default();
        for key in KEYS.iter().filter(|k| (k.render)(&current.config) != (k.render)(&new)) {
            if key.live {
                (key.copy)(&mut merged, &new);
                applied.live.push(key.id());
            } else {
                applied.need_restart.push(key.id());
            }
        }
        if !applied.live.is_empty() {
            log::set_max_level(merged.log.level);
            current.config = Arc::new(merged);
        }
        current.generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        applied
    }

    pub fn set_agent_line(&self, line: String) {
        let mut current = self.lock();
        current.agent_line = line.into();
        current.generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn live_keys_apply_and_the_rest_waits_for_a_restart() {
        let live = Live::new(Config::defaults(), "{}".into());
        let mut view = live.view();
        assert!(!live.refresh(&mut view));
        let new = Config::parse(
            "[events]\nbatch_interval = \"5s\"\n[server]\nurl = \"https://other:27000\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        let applied = live.apply(new);
        assert_eq!(applied.live, vec!["events.batch_interval"]);
        assert_eq!(applied.need_restart, vec!["server.url"]);
        assert!(live.refresh(&mut view));
        assert_eq!(view.config.events.batch_interval, std::time::Duration::from_secs(5));
        assert_eq!(view.config.server.urls, vec!["https://localhost:27000"], "not applied live");
        assert!(applied.describe().contains("restart the agent to apply server.url"));
    }

    #[test]
    fn every_live_key_is_applied() {
        let live = Live::new(Config::defaults(), "{}".into());
        let text = "[agent]\nremote_config = false\n\
            [events]\nbatch_max_bytes = \"2MB\"\nbatch_max_events = 5\nbatch_interval = \"5s\"\n\
            buffer_events = 50\nbuffer_bytes = \"1MiB\"\noverflow = \"block\"\n[retry]\ninitial = \"2s\"\nmax = \"90s\"\n\
            [log]\nlevel = \"debug\"\nfile = \"/tmp/x.log\"\n";
        let new = Config::parse(text, Path::new("x.toml")).unwrap();
        let applied = live.apply(new.clone());
        let live_keys: Vec<String> = KEYS.iter().filter(|k| k.live).map(|k| k.id()).collect();
        assert_eq!((applied.live, applied.need_restart), (live_keys, vec!["log.file".to_string()]));
        let (running, defaults) = (live.config(), Config::defaults());
        for k in KEYS {
            let want = if k.live { (k.render)(&new) } else { (k.render)(&defaults) };
            assert_eq!((k.render)(&running), want, "{}", k.id());
        }
    }
}
