//! The stateless ring buffer and batching policy ([`Ring`], pure) and the batcher thread ([`run`]): one batch
//! is handed to the uploader at a time (a rendezvous channel), so events wait here while the server is slow or
//! away; `overflow` applies to socket producers, tracked events are never dropped (ARCHITECTURE.md).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};

use crate::config::Overflow;
use crate::event::Event;
use crate::live::Live;
use crate::queue::Append;
use crate::status::Stats;

/// Batching limits, in the units of the final request.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub max_events: usize,
    pub max_bytes: usize,
    pub interval: Duration,
    /// Bytes of the agent metadata line that starts every body.
    pub overhead: usize,
    pub capacity: usize,
    /// Bound on the buffered events' `wire_len` sum.
    pub capacity_bytes: usize,
    pub overflow: Overflow,
}

impl Policy {
    pub fn from_config(c: &crate::config::Config, overhead: usize) -> Policy {
        Policy {
            max_events: c.events.batch_max_events,
            max_bytes: c.events.batch_max_bytes as usize,
            interval: c.events.batch_interval,
            overhead,
            capacity: c.events.buffer_events,
            capacity_bytes: usize::try_from(c.events.buffer_bytes).unwrap_or(usize::MAX),
            overflow: c.events.overflow,
        }
    }
}

/// The bounded buffer of stateless events with their arrival times.
#[derive(Debug)]
pub struct Ring {
    events: VecDeque<(Event, Instant)>,
    /// Sum of `wire_len` of the buffered events.
    bytes: usize,
    policy: Policy,
}

impl Ring {
    pub fn new(policy: Policy) -> Ring {
        // Do not preallocate the whole capacity: a mostly idle agent should stay small.
        Ring { events: VecDeque::new(), bytes: 0, policy }
    }

    /// Whether an event of `n` wire bytes fits now: an empty buffer takes any one event.
    fn fits(&self, n: usize) -> bool {
        self.events.is_empty()
            || (self.events.len() < self.policy.capacity && self.bytes + n <= self.policy.capacity_bytes)
    }

    /// Stores `event` and returns how many events were dropped for it (`drop_oldest`: older untracked ones,
    /// or itself when only tracked ones are buffered); `Err(event)`: full, it must wait (`block`, or tracked).
    pub fn push(&mut self, event: Event, now: Instant) -> Result<usize, Event> {
        let n = event.wire_len();
        let mut dropped = 0;
        while !self.fits(n) {
            if event.is_tracked() || self.policy.overflow == Overflow::Block {
                return Err(event);
            }
            // The oldest event nobody else holds: a tracked one is still its reader's.
            let Some(i) = self.events.iter().position(|(e, _)| !e.is_tracked()) else { return Ok(1) };
            if let Some((old, _)) = self.events.remove(i) {
                self.bytes -= old.wire_len();
                dropped += 1;
            }
        }
        self.bytes += n;
        self.events.push_back((event, now));
        Ok(dropped)
    }

    /// When the oldest event's wait ends (`None`: empty).
    pub fn deadline(&self) -> Option<Instant> {
        self.events.front().map(|(_, t)| *t + self.policy.interval)
    }

    /// Whether a batch should be cut now. A ring full (or half full in bytes) before a batch
    /// is (limits set smaller than a batch) is cut at once: waiting for `interval` would make
    /// producers wait, or drop under `drop_oldest`, while the server is idle.
    pub fn ready(&self, now: Instant) -> bool {
        !self.events.is_empty()
            && (self.events.len() >= self.policy.max_events
                || self.policy.overhead + self.bytes >= self.policy.max_bytes
                || self.events.len() >= self.policy.capacity
                || self.bytes.saturating_mul(2) >= self.policy.capacity_bytes
                || self.deadline().is_some_and(|d| now >= d))
    }

    /// Takes the oldest events that fit one request (at least one: an oversized one gets a 413).
    pub fn cut(&mut self) -> Vec<Event> {
        let (mut body, mut out) = (self.policy.overhead, Vec::new());
        while let Some((e, _)) = self.events.front() {
            let n = e.wire_len();
            if !out.is_empty() && (out.len() >= self.policy.max_events || body + n > self.policy.max_bytes) {
                break;
            }
            body += n;
            self.bytes -= n;
            out.extend(self.events.pop_front().map(|(e, _)| e));
        }
        out
    }

    /// Moves `waiting` into the buffer, in order, until an event must wait; counts what was dropped.
    fn take_from(&mut self, waiting: &mut VecDeque<Event>, now: Instant, stats: &Stats) {
        while let Some(e) = waiting.pop_front() {
            match self.push(e, now) {
                Ok(dropped) => Stats::add(&stats.dropped, dropped as u64),
                Err(e) => return waiting.push_front(e),
            }
        }
    }
}

/// The batcher thread's channels.
pub struct Wiring {
    /// Chunks of stateless events from the ingest connections.
    pub input: Receiver<Vec<Event>>,
    /// Chunks from the modules (their `EventSink`s), taken only while there is room for them.
    pub readers: Receiver<Vec<Event>>,
    /// One batch at a time to the uploader.
    pub out: Sender<Vec<Event>>,
    /// The durable queue, for what is left at shutdown.
    pub spill: Sender<Append>,
    /// Closed by the supervisor to start the shutdown flush.
    pub shutdown: Receiver<()>,
    /// Set by the supervisor before it closes `shutdown`.
    pub deadline: Arc<OnceLock<Instant>>,
}

/// The batcher thread. After `shutdown` closes, what it holds is offered to the uploaders
/// until `deadline` and the rest spilled to the durable queue, so a clean stop loses nothing.
pub fn run(wiring: Wiring, policy: Policy, live: Arc<Live>, stats: Arc<Stats>) {
    let Wiring { mut input, mut readers, out, spill, shutdown, deadline } = wiring;
    let (mut ring, mut view) = (Ring::new(policy), live.view());
    // Events received but not yet in the ring: from sockets (only when `block` stopped intake),
    // and from the modules (a full buffer stops their intake, whatever `overflow` says).
    let (mut carry, mut held) = (VecDeque::new(), VecDeque::new());
    let never = crossbeam_channel::never::<Vec<Event>>();
    // Kept alive, never received from: a send to it is never ready.
    let (nobody, _nobody_rx) = crossbeam_channel::bounded::<Vec<Event>>(0);

    loop {
        if live.refresh(&mut view) {
            // New limits take effect for the next push and cut (a smaller capacity than the
            // current backlog drains by delivery, not by dropping).
            ring.policy = Policy::from_config(&view.config, view.agent_line.len());
        }
        let now = Instant::now();
        // Modules first: what a cut freed goes to the reader that has been waiting for it.
        ring.take_from(&mut held, now, &stats);
        ring.take_from(&mut carry, now, &stats);
        stats.buffered.store((ring.events.len() + carry.len() + held.len()) as u64, Ordering::Relaxed);
        let intake = if carry.is_empty() { &input } else { &never };
        let from_readers = if held.is_empty() { &readers } else { &never };
        // No batch due: the send arm points at a channel nobody receives from (`select!` builds the
        // batch only for the arm it takes) and the wait ends at the oldest event's deadline.
        let ready = ring.ready(now);
        let offer = if ready { &out } else { &nobody };
        let due = ring.deadline().filter(|_| !ready);
        let wait = due.map_or(Duration::from_secs(3600), |d| d.saturating_duration_since(now));
        select! {
            send(offer, ring.cut()) -> res => if res.is_err() { break },
            recv(intake) -> chunk => match chunk {
                Ok(c) => carry.extend(c),
                // Disconnected (and so empty): no more from there.
                Err(_) => input = crossbeam_channel::never(),
            },
            recv(from_readers) -> chunk => match chunk {
                Ok(c) => held.extend(c),
                Err(_) => readers = crossbeam_channel::never(),
            },
            recv(shutdown) -> _ => break,
            default(wait) => {}
        }
    }

    // Shutdown: take what producers already handed over (unbounded: nothing is dropped), then flush.
    ring.policy = Policy { capacity: usize::MAX, capacity_bytes: usize::MAX, ..ring.policy };
    let mut late: VecDeque<Event> = held.into_iter().chain(carry).collect();
    late.extend(readers.try_iter().chain(input.try_iter()).flatten());
    ring.take_from(&mut late, Instant::now(), &stats);
    let end = deadline.get().copied().unwrap_or_else(Instant::now);
    let mut rest = Vec::new();
    while !ring.events.is_empty() && Instant::now() < end {
        if let Err(e) = out.send_timeout(ring.cut(), end.saturating_duration_since(Instant::now())) {
            // The uploader is not taking more: keep the batch for the queue.
            rest = e.into_inner();
            break;
        }
        stats.buffered.store(ring.events.len() as u64, Ordering::Relaxed);
    }
    rest.extend(ring.events.drain(..).map(|(e, _)| e));
    stats.buffered.store(0, Ordering::Relaxed);
    crate::queue::spill(&spill, rest, &stats, "buffered");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Kind;

    fn ev(i: usize) -> Event {
        // Every event is 20 wire bytes: 9-byte header + newline + 9-byte data + newline.
        Event::new(Kind::Stateless, &format!("{{\"m\":{i:03}}}"), Some(&format!("{{\"d\":{i:03}}}")))
    }

    fn policy(max_events: usize, max_bytes: usize, capacity: usize, overflow: Overflow) -> Policy {
        let (interval, capacity_bytes) = (Duration::from_secs(1), usize::MAX);
        Policy { max_events, max_bytes, interval, overhead: 10, capacity, capacity_bytes, overflow }
    }

    #[test]
    fn cut_triggers() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // (policy, events pushed at t0, check time, ready?, sizes of successive cuts)
        let table: Vec<(Policy, usize, Instant, bool, Vec<usize>)> = vec![
            (policy(5, 10_000, 100, Overflow::DropOldest), 4, ms(10), false, vec![4]),
            (policy(5, 10_000, 100, Overflow::DropOldest), 5, ms(10), true, vec![5]),
            (policy(5, 10_000, 100, Overflow::DropOldest), 12, ms(10), true, vec![5, 5, 2]),
            (policy(100, 10 + 20 * 3, 100, Overflow::DropOldest), 3, ms(10), true, vec![3]),
            (policy(100, 10 + 20 * 3, 100, Overflow::DropOldest), 2, ms(10), false, vec![2]),
            (policy(100, 10 + 20 * 3, 100, Overflow::DropOldest), 7, ms(10), true, vec![3, 3, 1]),
            (policy(100, 10_000, 100, Overflow::DropOldest), 1, ms(999), false, vec![1]),
            (policy(100, 10_000, 100, Overflow::DropOldest), 1, ms(1000), true, vec![1]),
            // A ring smaller than a batch: full is ready (not after the interval).
            (policy(100, 10_000, 3, Overflow::DropOldest), 3, ms(10), true, vec![3]),
            (policy(100, 10_000, 3, Overflow::DropOldest), 2, ms(10), false, vec![2]),
            // An event larger than max_bytes still goes out, alone.
            (policy(100, 15, 100, Overflow::DropOldest), 2, ms(0), true, vec![1, 1]),
        ];
        for (i, (p, n, at, ready, cuts)) in table.into_iter().enumerate() {
            let mut r = Ring::new(p);
            for k in 0..n {
                r.push(ev(k), t0).unwrap();
            }
            assert_eq!(r.ready(at), ready, "case {i}");
            let mut sizes = Vec::new();
            while !r.events.is_empty() {
                sizes.push(r.cut().len());
            }
            assert_eq!(sizes, cuts, "case {i}");
        }
    }

    #[test]
    fn oldest_event_sets_the_deadline() {
        let t0 = Instant::now();
        let mut r = Ring::new(policy(100, 10_000, 100, Overflow::DropOldest));
        assert_eq!(r.deadline(), None);
        r.push(ev(0), t0).unwrap();
        r.push(ev(1), t0 + Duration::from_millis(500)).unwrap();
        assert_eq!(r.deadline(), Some(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn drop_oldest_counts_and_keeps_the_newest() {
        let t0 = Instant::now();
        let mut r = Ring::new(policy(100, 10_000, 3, Overflow::DropOldest));
        let results: Vec<Result<usize, Event>> = (0..5).map(|i| r.push(ev(i), t0)).collect();
        assert_eq!(results, [0, 0, 0, 1, 1].map(Ok));
        assert_eq!(r.cut(), vec![ev(2), ev(3), ev(4)]);
    }

    #[test]
    fn block_refuses_when_full() {
        let t0 = Instant::now();
        let mut r = Ring::new(policy(100, 10_000, 2, Overflow::Block));
        assert_eq!(r.push(ev(0), t0), Ok(0));
        assert_eq!(r.push(ev(1), t0), Ok(0));
        assert_eq!(r.push(ev(2), t0), Err(ev(2)));
        assert_eq!(r.cut(), vec![ev(0), ev(1)]);
    }

    /// (policy, pushes: (event number, tracked?), expected results, what stays) — events are 20 bytes.
    #[test]
    fn bytes_bound_the_buffer_and_tracked_events_are_never_dropped() {
        let t0 = Instant::now();
        let (tx, _rx) = crossbeam_channel::bounded(1);
        let receipt = crate::event::Receipt::open(tx);
        let bytes = |cap, overflow| Policy { capacity_bytes: cap, ..policy(100, 10_000, 100, overflow) };
        let (t, u) = (true, false);
        type Case = (Policy, Vec<(usize, bool)>, Vec<Result<usize, Event>>, Vec<usize>);
        let table: Vec<Case> = vec![
            // 60 bytes hold 3 events; the fourth drops the oldest (drop_oldest) or waits (block).
            (
                bytes(60, Overflow::DropOldest),
                vec![(0, u), (1, u), (2, u), (3, u)],
                vec![Ok(0), Ok(0), Ok(0), Ok(1)],
                vec![1, 2, 3],
            ),
            (
                bytes(60, Overflow::Block),
                vec![(0, u), (1, u), (2, u), (3, u)],
                vec![Ok(0), Ok(0), Ok(0), Err(ev(3))],
                vec![0, 1, 2],
            ),
            // One event larger than the bound still goes into an empty buffer.
            (bytes(10, Overflow::Block), vec![(0, u), (1, u)], vec![Ok(0), Err(ev(1))], vec![0]),
            // Tracked events wait whatever the policy says, and are never the ones dropped.
            (
                bytes(60, Overflow::DropOldest),
                vec![(0, t), (1, u), (2, t), (3, t)],
                vec![Ok(0), Ok(0), Ok(0), Err(ev(3))],
                vec![0, 1, 2],
            ),
            (
                bytes(60, Overflow::DropOldest),
                vec![(0, t), (1, u), (2, t), (3, u)],
                vec![Ok(0), Ok(0), Ok(0), Ok(1)],
                vec![0, 2, 3],
            ),
            // Full of tracked events: a socket event under drop_oldest is the one dropped.
            (bytes(40, Overflow::DropOldest), vec![(0, t), (1, t), (2, u)], vec![Ok(0), Ok(0), Ok(1)], vec![0, 1]),
        ];
        for (i, (p, pushes, results, kept)) in table.into_iter().enumerate() {
            let mut r = Ring::new(p);
            let got: Vec<Result<usize, Event>> = pushes
                .iter()
                .map(|&(k, tracked)| r.push(if tracked { ev(k).tracked(&receipt) } else { ev(k) }, t0))
                .collect();
            assert_eq!(got, results, "case {i}");
            assert_eq!(r.cut(), kept.into_iter().map(ev).collect::<Vec<_>>(), "case {i}");
        }
    }

    type Started = (
        [Sender<Vec<Event>>; 2],
        Receiver<Vec<Event>>,
        Receiver<Append>,
        Sender<()>,
        Arc<Stats>,
        std::thread::JoinHandle<()>,
        Arc<OnceLock<Instant>>,
    );

    fn start(p: Policy) -> Started {
        let (in_tx, in_rx) = crossbeam_channel::bounded(4);
        let (readers_tx, readers) = crossbeam_channel::bounded(1);
        let (out_tx, out_rx) = crossbeam_channel::bounded(0);
        let (spill_tx, spill_rx) = crossbeam_channel::bounded(4);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let stats = Arc::new(Stats::default());
        let deadline = Arc::new(OnceLock::new());
        let (s, d) = (stats.clone(), deadline.clone());
        let w = Wiring { input: in_rx, readers, out: out_tx, spill: spill_tx, shutdown: stop_rx, deadline: d };
        let live = crate::live::Live::new(crate::config::Config::defaults(), String::new());
        let h = std::thread::spawn(move || run(w, p, live, s));
        ([in_tx, readers_tx], out_rx, spill_rx, stop_tx, stats, h, deadline)
    }

    #[test]
    fn thread_drops_exactly_the_overflow_while_nobody_uploads() {
        let ([tx, _], out, _spill, stop, stats, h, deadline) = start(policy(100, 10_000, 10, Overflow::DropOldest));
        tx.send((0..25).map(ev).collect()).unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while stats.dropped.load(Ordering::Relaxed) < 15 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 15);
        let got = out.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(got, (15..25).map(ev).collect::<Vec<_>>());
        deadline.set(Instant::now()).unwrap();
        drop(stop);
        h.join().unwrap();
    }

    #[test]
    fn thread_spills_what_it_cannot_send_at_shutdown() {
        let ([tx, _], _out, spill, stop, _stats, h, deadline) = start(policy(100, 10_000, 100, Overflow::Block));
        tx.send((0..7).map(ev).collect()).unwrap();
        // Stop with an already-passed deadline (nobody uploads): whether the chunk was
        // taken before the stop or is drained after it, it must end up in the spill.
        deadline.set(Instant::now()).unwrap();
        drop(stop);
        let a = spill.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(a.events, (0..7).map(ev).collect::<Vec<_>>());
        a.reply.send(crate::queue::Appended { stored: 7, error: None }).unwrap();
        h.join().unwrap();
    }

    #[test]
    fn thread_holds_tracked_events_back_while_sockets_overflow_and_never_spills_them() {
        let ([tx, readers], out, spill, stop, stats, h, deadline) =
            start(policy(100, 10_000, 10, Overflow::DropOldest));
        let (wake, settled) = crossbeam_channel::bounded(1);
        let receipt = crate::event::Receipt::open(wake);
        readers.send((0..25).map(|i| ev(i).tracked(&receipt)).collect()).unwrap();
        receipt.close();
        // The ring takes 10 tracked events and holds the rest back; socket events cannot evict them.
        let until = Instant::now() + Duration::from_secs(10);
        while stats.buffered.load(Ordering::Relaxed) < 25 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        tx.send((100..105).map(ev).collect()).unwrap();
        while stats.dropped.load(Ordering::Relaxed) < 5 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 5, "the socket events were the ones dropped");
        let first = out.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(first, (0..10).map(ev).collect::<Vec<_>>());
        first.iter().for_each(Event::settle);
        drop(first);
        assert!(!receipt.settled());
        // At shutdown the rest is neither delivered nor spilled: the reader still has it.
        deadline.set(Instant::now()).unwrap();
        drop(stop);
        h.join().unwrap();
        assert!(spill.try_recv().is_err(), "tracked events are not spilled");
        assert!(settled.try_recv().is_err() && crate::event::Receipt::abandoned(&receipt));
    }
}
