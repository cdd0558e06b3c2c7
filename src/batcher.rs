//! The stateless ring buffer and batching policy ([`Ring`], pure) and the batcher thread ([`run`]).
//!
//! A batch is cut when it reaches `batch_max_events`, when the body would reach `batch_max_bytes`,
//! or when its oldest event is `batch_interval` old. One batch is handed to the uploader at a time
//! (a rendezvous channel), so while the server is slow or away, events wait here, in a buffer of
//! `buffer_events` where `overflow` decides between dropping the oldest (counted) and blocking.

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
            overflow: c.events.overflow,
        }
    }
}

/// What [`Ring::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Stored,
    /// Stored, and the oldest event was dropped to make room.
    DroppedOldest,
    /// Not stored: the buffer is full and the policy is `block`.
    Full,
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

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.events.len() >= self.policy.capacity
    }

    pub fn push(&mut self, event: Event, now: Instant) -> Push {
        let result = match (self.is_full(), self.policy.overflow) {
            (false, _) => Push::Stored,
            (true, Overflow::Block) => return Push::Full,
            (true, Overflow::DropOldest) => {
                if let Some((old, _)) = self.events.pop_front() {
                    self.bytes -= old.wire_len();
                }
                Push::DroppedOldest
            }
        };
        self.bytes += event.wire_len();
        self.events.push_back((event, now));
        result
    }

    /// When the oldest event's wait ends (`None`: empty).
    pub fn deadline(&self) -> Option<Instant> {
        self.events.front().map(|(_, t)| *t + self.policy.interval)
    }

    /// Whether a batch should be cut now.
    pub fn ready(&self, now: Instant) -> bool {
        !self.events.is_empty()
            && (self.events.len() >= self.policy.max_events
                || self.policy.overhead + self.bytes >= self.policy.max_bytes
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
}

/// The batcher thread's channels.
pub struct Wiring {
    /// Chunks of stateless events from the ingest connections (and collectors).
    pub input: Receiver<Vec<Event>>,
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
    let Wiring { input, out, spill, shutdown, deadline } = wiring;
    let mut ring = Ring::new(policy);
    let mut view = live.view();
    // Events received but not yet in the ring (only when `block` stopped intake).
    let mut carry: VecDeque<Event> = VecDeque::new();
    let never = crossbeam_channel::never::<Vec<Event>>();
    // Kept alive, never received from: a send to it is never ready.
    let (nobody, _nobody_rx) = crossbeam_channel::bounded::<Vec<Event>>(0);
    let mut input_open = true;
    let publish = |ring: &Ring, carry: &VecDeque<Event>| {
        stats.buffered.store((ring.len() + carry.len()) as u64, Ordering::Relaxed);
    };
    // Moves a chunk into the ring; under `block`, what does not fit stays in `carry`.
    let pushback = |ring: &mut Ring, carry: &mut VecDeque<Event>, chunk: Vec<Event>, now: Instant| {
        carry.extend(chunk);
        while let Some(e) = carry.pop_front() {
            if ring.is_full() && ring.policy.overflow == Overflow::Block {
                carry.push_front(e);
                break;
            }
            if ring.push(e, now) == Push::DroppedOldest {
                Stats::add(&stats.dropped, 1);
            }
        }
    };

    loop {
        if live.refresh(&mut view) {
            // New limits take effect for the next push and cut (a smaller capacity than the
            // current backlog drains by delivery, not by dropping).
            ring.policy = Policy::from_config(&view.config, view.agent_line.len());
        }
        let now = Instant::now();
        pushback(&mut ring, &mut carry, Vec::new(), now);
        publish(&ring, &carry);
        let intake = if input_open && carry.is_empty() { &input } else { &never };
        // No batch due: the send arm points at a channel nobody receives from (`select!` builds the
        // batch only for the arm it takes) and the wait ends at the oldest event's deadline.
        let ready = ring.ready(now);
        let offer = if ready { &out } else { &nobody };
        let due = ring.deadline().filter(|_| !ready);
        let wait = due.map_or(Duration::from_secs(3600), |d| d.saturating_duration_since(now));
        select! {
            send(offer, ring.cut()) -> res => if res.is_err() { break },
            recv(intake) -> chunk => match chunk {
                Ok(c) => pushback(&mut ring, &mut carry, c, Instant::now()),
                Err(_) => input_open = false,
            },
            recv(shutdown) -> _ => break,
            default(wait) => {}
        }
    }

    // Shutdown: take what producers already handed over, then flush.
    ring.policy = Policy { capacity: usize::MAX, overflow: Overflow::Block, interval: Duration::ZERO, ..ring.policy };
    let now = Instant::now();
    for e in carry.drain(..).chain(input.try_iter().flatten()) {
        ring.push(e, now);
    }
    let end = deadline.get().copied().unwrap_or_else(Instant::now);
    let mut rest = Vec::new();
    while !ring.is_empty() {
        let remaining = end.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        if let Err(e) = out.send_timeout(ring.cut(), remaining) {
            // The uploader is not taking more: keep the batch for the queue.
            rest = e.into_inner();
            break;
        }
        publish(&ring, &carry);
    }
    rest.extend(ring.events.drain(..).map(|(e, _)| e));
    stats.buffered.store(0, Ordering::Relaxed);
    if !rest.is_empty() {
        crate::queue::spill(&spill, rest, &stats, "buffered");
    }
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
        Policy { max_events, max_bytes, interval: Duration::from_secs(1), overhead: 10, capacity, overflow }
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
            // An event larger than max_bytes still goes out, alone.
            (policy(100, 15, 100, Overflow::DropOldest), 2, ms(0), true, vec![1, 1]),
        ];
        for (i, (p, n, at, ready, cuts)) in table.into_iter().enumerate() {
            let mut r = Ring::new(p);
            for k in 0..n {
                r.push(ev(k), t0);
            }
            assert_eq!(r.ready(at), ready, "case {i}");
            let mut sizes = Vec::new();
            while !r.is_empty() {
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
        r.push(ev(0), t0);
        r.push(ev(1), t0 + Duration::from_millis(500));
        assert_eq!(r.deadline(), Some(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn drop_oldest_counts_and_keeps_the_newest() {
        let t0 = Instant::now();
        let mut r = Ring::new(policy(100, 10_000, 3, Overflow::DropOldest));
        let results: Vec<Push> = (0..5).map(|i| r.push(ev(i), t0)).collect();
        assert_eq!(results, vec![Push::Stored, Push::Stored, Push::Stored, Push::DroppedOldest, Push::DroppedOldest]);
        assert_eq!(r.cut(), vec![ev(2), ev(3), ev(4)]);
    }

    #[test]
    fn block_refuses_when_full() {
        let t0 = Instant::now();
        let mut r = Ring::new(policy(100, 10_000, 2, Overflow::Block));
        assert_eq!(r.push(ev(0), t0), Push::Stored);
        assert_eq!(r.push(ev(1), t0), Push::Stored);
        assert_eq!(r.push(ev(2), t0), Push::Full);
        assert_eq!(r.cut(), vec![ev(0), ev(1)]);
    }

    type Started = (
        Sender<Vec<Event>>,
        Receiver<Vec<Event>>,
        Receiver<Append>,
        Sender<()>,
        Arc<Stats>,
        std::thread::JoinHandle<()>,
        Arc<OnceLock<Instant>>,
    );

    fn start(p: Policy) -> Started {
        let (in_tx, in_rx) = crossbeam_channel::bounded(4);
        let (out_tx, out_rx) = crossbeam_channel::bounded(0);
        let (spill_tx, spill_rx) = crossbeam_channel::bounded(4);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let stats = Arc::new(Stats::default());
        let deadline = Arc::new(OnceLock::new());
        let (s, d) = (stats.clone(), deadline.clone());
        let w = Wiring { input: in_rx, out: out_tx, spill: spill_tx, shutdown: stop_rx, deadline: d };
        let live = crate::live::Live::new(crate::config::Config::defaults(), String::new());
        let h = std::thread::spawn(move || run(w, p, live, s));
        (in_tx, out_rx, spill_rx, stop_tx, stats, h, deadline)
    }

    #[test]
    fn thread_drops_exactly_the_overflow_while_nobody_uploads() {
        let (tx, out, _spill, stop, stats, h, deadline) = start(policy(100, 10_000, 10, Overflow::DropOldest));
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
        let (tx, _out, spill, stop, _stats, h, deadline) = start(policy(100, 10_000, 100, Overflow::Block));
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
}
