//! The module seam (ARCHITECTURE.md, Seams): a collector module declares a [`Module`], listed in [`MODULES`]; it hands
//! events to the sinks, never to a raw channel, so what the pipeline answers comes back in one place.

use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, select};

use crate::config::Config;
use crate::event::{Event, Receipt};
use crate::queue::{Append, Appended};
use crate::status::Stats;

/// What the supervisor knows of a module.
pub struct Module {
    /// The thread's name, also used in logs.
    pub name: &'static str,
    /// Its section of the configuration file.
    pub section: &'static str,
    /// Its state file under `agent.data_dir`, handed over as [`Context::state`].
    pub state: &'static str,
    pub enabled: fn(&Config) -> bool,
    /// The thread's body: runs until [`Context::stop`] closes, then saves its state.
    pub run: fn(Config, Context),
}

/// Every module the build has (cargo features, README Footprint), in start order.
pub const MODULES: &[Module] = &[
    #[cfg(feature = "logcollector")]
    crate::logcollector::MODULE,
    #[cfg(feature = "inventory")]
    crate::inventory::MODULE,
    #[cfg(feature = "fim")]
    crate::fim::MODULE,
];

/// What a module's thread gets.
pub struct Context {
    pub events: EventSink,
    pub durable: DurableSink,
    /// The module's own state file (`<data_dir>/<Module::state>`).
    pub state: PathBuf,
    /// The agent's UUID (document ids are derived from it).
    pub uuid: String,
    pub stats: Arc<Stats>,
    /// Closes when the module is to stop (no message is ever sent).
    pub stop: Receiver<()>,
}

/// Why a sink did not take events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The module was told to stop while it waited.
    #[error("stopped")]
    Stopped,
    #[error("the pipeline is gone")]
    Gone,
}

/// The stateless sink: event chunks to the batcher, their delivery receipts back (ARCHITECTURE.md, Delivery receipts).
pub struct EventSink {
    tx: Sender<Vec<Event>>,
    stop: Receiver<()>,
    /// One wake-up per settled receipt at most is pending: the module looks at all of them.
    settled: (Sender<()>, Receiver<()>),
}

impl EventSink {
    pub fn new(tx: Sender<Vec<Event>>, stop: Receiver<()>) -> EventSink {
        EventSink { tx, stop, settled: crossbeam_channel::bounded(1) }
    }

    /// An open receipt for the events of one read (see [`Event::tracked`], [`Receipt::close`]).
    pub fn receipt(&self) -> Arc<Receipt> {
        Receipt::open(self.settled.0.clone())
    }

    /// Ready when a receipt of this sink settled since the last receive.
    pub fn settled(&self) -> &Receiver<()> {
        &self.settled.1
    }

    /// Hands `chunk` to the pipeline if it takes it within `wait`, else gives it back: a
    /// reader that must go on watching its source (a file's name) does not block.
    pub fn send_within(&self, chunk: Vec<Event>, wait: std::time::Duration) -> Result<Option<Vec<Event>>, SinkError> {
        match self.tx.send_timeout(chunk, wait) {
            Ok(()) => Ok(None),
            Err(crossbeam_channel::SendTimeoutError::Timeout(chunk)) => Ok(Some(chunk)),
            Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => Err(SinkError::Gone),
        }
    }

    /// Hands `chunk` to the pipeline; blocks while it is full (overflow = "block": the
    /// module's source is the buffer) until it is taken or the module is told to stop.
    pub fn send(&self, chunk: Vec<Event>) -> Result<(), SinkError> {
        select! {
            send(self.tx, chunk) -> r => r.map_err(|_| SinkError::Gone),
            recv(self.stop) -> _ => Err(SinkError::Stopped),
        }
    }
}

/// The durable sink: stateful events to the queue, answered after the fsync that covers them.
pub struct DurableSink {
    tx: Sender<Append>,
    stop: Receiver<()>,
}

impl DurableSink {
    pub fn new(tx: Sender<Append>, stop: Receiver<()>) -> DurableSink {
        DurableSink { tx, stop }
    }

    /// Appends `events` and waits for the queue's answer, or until the module is told to stop.
    pub fn append(&self, events: Vec<Event>) -> Result<Appended, SinkError> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.tx.send(Append { events, reply }).map_err(|_| SinkError::Gone)?;
        select! {
            recv(rx) -> r => r.map_err(|_| SinkError::Gone),
            recv(self.stop) -> _ => Err(SinkError::Stopped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(feature = "logcollector", feature = "inventory"))]
    fn modules_start_only_when_configured() {
        use crate::config::FileSpec;
        let enabled = |c: &Config| MODULES.iter().filter(|m| (m.enabled)(c)).map(|m| m.name).collect::<Vec<_>>();
        let mut c = Config::defaults();
        c.inventory.enabled = false;
        c.logcollector.files.clear();
        assert_eq!(enabled(&c), Vec::<&str>::new());
        c.logcollector.files.push(FileSpec { pattern: "/var/log/syslog".into(), start: None });
        assert_eq!(enabled(&c), ["logcollector"]);
        c.inventory.enabled = true;
        assert_eq!(enabled(&c), ["logcollector", "inventory"]);
        c.inventory.collectors.clear();
        assert_eq!(enabled(&c), ["logcollector"], "inventory without collectors has nothing to scan");
    }

    #[test]
    fn names_sections_and_state_files_are_distinct_and_documented() {
        let example = include_str!("../etc/wazuh-agent.toml");
        for (i, m) in MODULES.iter().enumerate() {
            assert!(example.contains(&format!("[{}]", m.section)), "{} has no section in the example", m.name);
            assert!(MODULES[..i].iter().all(|o| o.name != m.name && o.state != m.state), "{}", m.name);
        }
    }

    #[test]
    fn sinks_stop_waiting_when_told_to_stop() {
        let (stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        let (tx, _rx) = crossbeam_channel::bounded(0);
        let (qtx, _qrx) = crossbeam_channel::bounded(1);
        let (events, durable) = (EventSink::new(tx, stop.clone()), DurableSink::new(qtx, stop));
        drop(stop_tx);
        assert_eq!(events.send(Vec::new()), Err(SinkError::Stopped));
        assert_eq!(durable.append(Vec::new()).map(|a| a.stored), Err(SinkError::Stopped));
    }

    #[test]
    fn sinks_report_a_pipeline_that_is_gone() {
        let (_stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (qtx, qrx) = crossbeam_channel::bounded(1);
        drop((rx, qrx));
        assert_eq!(EventSink::new(tx, stop.clone()).send(Vec::new()), Err(SinkError::Gone));
        assert_eq!(DurableSink::new(qtx, stop).append(Vec::new()).map(|a| a.stored), Err(SinkError::Gone));
    }
}
