//! The server session (ARCHITECTURE.md, Seams): the one call loop around [`http::classify`], for every thread that
//! talks to the comms API with a token. [`next_step`] decides (pure); [`Session::call`] waits, logs and counts.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, TryRecvError};

use crate::backoff::Backoff;
use crate::config::RetryConfig;
use crate::http::{self, Attempt, Outcome, Rejection, Reply, Request};
use crate::live::Live;
use crate::status::Stats;
use crate::token::{Token, TokenCell};

/// How long to wait for a token newer than a refused one before trying the current one again.
const REAUTH_WAIT: Duration = Duration::from_secs(30);
/// A long poll whose hold ended sooner than this was not held (see `Step::Repoll`).
pub const MIN_HOLD: Duration = Duration::from_secs(1);
/// Waits for a token are cut into slices this long, so that a stop is noticed.
const TOKEN_SLICE: Duration = Duration::from_millis(500);
/// 5xx answers in a row to a gzip body before the same body is sent once uncompressed (the probe).
pub const GZIP_TRIES: u32 = 3;

/// What a session is for: which refusals reach the caller, and what a timeout means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The uploaders: 400 and 413 go back to the caller (to bisect, to split); any other refusal
    /// is retried slowly (events are never dropped for an answer not about them). Resends count.
    Events,
    /// The command long-poll: a hold that ends (408, or our timeout) is polled again at once;
    /// every refusal is retried slowly, so a call ends only with a reply or a stop.
    Commands,
    /// Group file downloads: every refusal goes back to the caller (404: no such file).
    Files,
}

/// What ends a session's calls and waits early.
pub enum Stop {
    /// The channel closes (its sender is dropped): stop at once.
    Now(Receiver<()>),
    /// The uploaders: once the channel closes, go on until the deadline (set before).
    Drain { shutdown: Receiver<()>, deadline: Arc<OnceLock<Instant>> },
}

/// One request: `path` (and query) is below the token's server; `what` names it in logs;
/// `until` is the caller's own deadline (a command's timeout), if any.
pub struct Call<'a> {
    pub path: &'a str,
    pub request: Request<'a>,
    pub what: &'a str,
    pub until: Option<Instant>,
}

/// Why a call ended without the server taking the request.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// The server refused the request for good; `status` and `message` are its answer.
    Refused { kind: Rejection, status: u16, message: String },
    /// Shutdown, the shutdown deadline or the caller's deadline came first.
    Stopped,
}

/// What the call loop does after one attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The call ends: the server took the request, or refused it in a way the caller acts on.
    End(Result<Reply, Failure>),
    /// The token was refused: ask for a new one, wait for it, resend.
    Reauth,
    /// A long-poll's hold ended: poll again at once.
    Repoll,
    /// Resend after `delay`. `down`: no answer; `failover`: the server looks down (no answer,
    /// or a 5xx without `Retry-After`); `wrong_url`: not about the request (404, 3xx …).
    Resend { delay: Duration, why: String, down: bool, failover: bool, wrong_url: bool },
}

/// The decision after one attempt: [`http::classify`] read for `role`, with the backoff
/// bounded by `retry` (read live by the caller) and `random` as its jitter.
pub fn next_step(
    role: Role,
    result: Result<Reply, ureq::Error>,
    now: SystemTime,
    retry: &RetryConfig,
    backoff: &mut Backoff,
    random: u64,
) -> Step {
    backoff.set_limits(retry.initial, retry.max);
    let outcome = http::classify(Attempt::of(&result, role == Role::Commands), now, retry.max);
    let hands_back = |kind| match role {
        Role::Events => matches!(kind, Rejection::Invalid | Rejection::TooLarge),
        Role::Commands => false,
        Role::Files => true,
    };
    let (delay, failover, wrong_url, result) = match (outcome, result) {
        (Outcome::Done, Ok(reply)) => return Step::End(Ok(reply)),
        // The answer would be as large again: the caller hears of it.
        (_, Err(ureq::Error::BodyExceedsLimit(n))) if role == Role::Files => {
            let message = format!("the answer is larger than the limit of {n} bytes");
            return Step::End(Err(Failure::Refused { kind: Rejection::TooLarge, status: 413, message }));
        }
        (Outcome::Reauth, _) => return Step::Reauth,
        (Outcome::Repoll, _) => {
            backoff.reset();
            return Step::Repoll;
        }
        (Outcome::Reject(kind), Ok(r)) if hands_back(kind) => {
            return Step::End(Err(Failure::Refused { kind, status: r.status, message: r.message() }));
        }
        // A `Retry-After` never shortens the policy's floor: 0 or a past date would spin.
        (Outcome::Retry { after, failover }, result) => {
            (after.map_or_else(|| backoff.next_delay_with(random), |d| d.max(retry.initial)), failover, false, result)
        }
        // A refusal the caller cannot act on: retry slowly and say what is wrong.
        (_, result) => (backoff.next_delay_with(random).max(retry.max / 2), false, true, result),
    };
    Step::Resend { delay, why: http::describe(&result), down: result.is_err(), failover, wrong_url }
}

/// The gzip fallback (docs/protocol.md, Compression) after an attempt answered `status` (None: no answer), `count`
/// 5xx in a row to gzip before it (at [`GZIP_TRIES`] it was the probe): the new count, and whether to fall back
/// (the probe was taken). Anything but a 5xx starts over: only a server that takes plain bodies loses gzip.
pub fn gzip_fallback(count: u32, status: Option<u16>) -> (u32, bool) {
    let again = count < GZIP_TRIES && matches!(status, Some(500..=599));
    (if again { count + 1 } else { 0 }, count == GZIP_TRIES && matches!(status, Some(200..=299)))
}

/// One thread's way to the comms API; `agent` is this thread's own connection pool.
pub struct Session {
    pub agent: ureq::Agent,
    pub cell: Arc<TokenCell>,
    pub live: Arc<Live>,
    pub stats: Arc<Stats>,
    pub stop: Stop,
    pub role: Role,
}

impl Session {
    /// Sends `call` to the token's server until it is taken (the reply), refused for good, or stopped.
    pub fn call(&self, call: &Call<'_>) -> Result<Reply, Failure> {
        let mut backoff = Backoff::new(Duration::ZERO, Duration::ZERO);
        let (mut refused, mut gzip_5xx) = (0, 0);
        let plain = if let Request::Gzip(_, l, e) = &call.request { Some(Request::Events(l, e)) } else { None };
        loop {
            let token = self.token(refused, call.until).ok_or(Failure::Stopped)?;
            let url = format!("{}{}", token.server, call.path);
            // One request's bound (as the agent's), cut to what is left before a deadline.
            let (config, commands) = (self.live.config(), self.role == Role::Commands);
            let timeout = if commands { config.server.commands_timeout } else { config.server.request_timeout };
            let left = self.end(call.until).map(|end| end.saturating_duration_since(Instant::now()));
            let bound = left.map_or(timeout, |left| timeout.min(left).max(Duration::from_millis(1)));
            let sent = Instant::now();
            // The gzip fallback's probe, and every body once it fell back, go uncompressed.
            let probe = gzip_5xx == GZIP_TRIES || self.stats.gzip_refused.get().is_some();
            let request = plain.as_ref().filter(|_| probe).unwrap_or(&call.request);
            let result = http::send(&self.agent, &url, Some(&token.bearer()), request, Some(bound));
            let (count, fall_back) = gzip_fallback(gzip_5xx, result.as_ref().ok().map(|r| r.status));
            gzip_5xx = if plain.is_some() { count } else { 0 };
            if fall_back && self.stats.gzip_refused.set(token.server.clone()).is_ok() {
                log::warn!(
                    "{url} answers 5xx to gzip bodies but took the same body plain: sending plain until restart; set server.compression = \"none\""
                );
            }
            if result.is_err() && self.stopped(call.until) {
                // Shutdown cut the request (or its deadline passed): not a failure to report.
                return Err(Failure::Stopped);
            }
            match next_step(self.role, result, SystemTime::now(), &config.retry, &mut backoff, fastrand::u64(..)) {
                Step::End(end) => {
                    self.stats.connected.fetch_or(end.is_ok(), Relaxed);
                    return end;
                }
                Step::Reauth => {
                    self.count_resend(false);
                    self.cell.refused(token.generation);
                    refused = token.generation;
                }
                // A hold that ends at once is no hold: a server or proxy that answers 408 at
                // once would be polled in a tight loop. Such a poll waits the retry floor.
                Step::Repoll if sent.elapsed() < MIN_HOLD => {
                    log::debug!("{} ended its hold after {}ms", call.what, sent.elapsed().as_millis());
                    if !self.pause(config.retry.initial, call.until) {
                        return Err(Failure::Stopped);
                    }
                }
                Step::Repoll => {}
                Step::Resend { delay, why, down, failover, wrong_url } => {
                    self.stats.connected.fetch_and(!down, Relaxed);
                    // With one server there is nowhere to go: the token stays as it is.
                    if failover && config.server.urls.len() > 1 {
                        self.cell.server_down(token.generation);
                    }
                    self.count_resend(!wrong_url);
                    let (what, ms) = (call.what, delay.as_millis());
                    if wrong_url {
                        log::error!("{url} answered {why} ({what}); check server.url; retrying in {ms}ms");
                    } else {
                        log::warn!("{what} failed ({why}); retrying in {ms}ms");
                    }
                    self.stats.set_error(format!("{url}: {why}"));
                    if !self.pause(delay, call.until) {
                        return Err(Failure::Stopped);
                    }
                }
            }
        }
    }

    fn count_resend(&self, batch_failed: bool) {
        if self.role == Role::Events {
            Stats::add(&self.stats.retries, 1);
            Stats::add(&self.stats.batches_failed, batch_failed as u64);
        }
    }

    /// A token newer than `refused` (0: any); after [`REAUTH_WAIT`], the current one. `None`: stopped.
    fn token(&self, refused: u64, until: Option<Instant>) -> Option<Arc<Token>> {
        let give_up = Instant::now() + REAUTH_WAIT;
        while !self.stopped(until) {
            match self.cell.wait_newer(refused, TOKEN_SLICE) {
                None if refused == 0 || Instant::now() < give_up => {}
                newer => return newer.or_else(|| self.cell.current()),
            }
        }
        None
    }

    /// The earliest of the caller's deadline and (draining) the shutdown deadline.
    fn end(&self, until: Option<Instant>) -> Option<Instant> {
        let drain = if let Stop::Drain { deadline, .. } = &self.stop { deadline.get().copied() } else { None };
        until.into_iter().chain(drain).min()
    }

    fn stopped(&self, until: Option<Instant>) -> bool {
        let closed = matches!(&self.stop, Stop::Now(rx) if !matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        closed || self.end(until).is_some_and(|end| Instant::now() >= end)
    }

    /// Waits `d`, ended early by a stop; returns false when stopped.
    pub fn pause(&self, d: Duration, until: Option<Instant>) -> bool {
        let wake = Instant::now() + d;
        let target = || self.end(until).map_or(wake, |end| end.min(wake));
        let (Stop::Now(rx) | Stop::Drain { shutdown: rx, .. }) = &self.stop;
        // Returns as soon as the channel closes; draining then waits on, up to the deadline.
        let _ = rx.recv_deadline(target());
        if let Stop::Drain { .. } = self.stop {
            std::thread::sleep(target().saturating_duration_since(Instant::now()));
        }
        !self.stopped(until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, retry_after: Option<&str>) -> Result<Reply, ureq::Error> {
        Ok(Reply { status, retry_after: retry_after.map(str::to_string), body: b"{\"message\":\"m\"}".to_vec() })
    }

    /// A step as text, so the table below stays readable.
    fn shape(step: &Step) -> String {
        match step {
            Step::End(Ok(r)) => format!("done {}", r.status),
            Step::End(Err(Failure::Refused { status, message, .. })) => format!("refused {status} {message}"),
            Step::End(Err(Failure::Stopped)) => "stopped".into(),
            Step::Reauth => "reauth".into(),
            Step::Repoll => "repoll".into(),
            Step::Resend { delay, down, failover, wrong_url, .. } => {
                let how = if *wrong_url {
                    "slow"
                } else if *down {
                    "down"
                } else {
                    "resend"
                };
                format!("{how} {}ms{}", delay.as_millis(), if *failover { " failover" } else { "" })
            }
        }
    }

    #[test]
    fn next_step_table() {
        use Role::*;
        let retry = RetryConfig { initial: Duration::from_secs(1), max: Duration::from_secs(60) };
        let timeout = || Err(ureq::Error::Timeout(ureq::Timeout::Global));
        let refused = || Err(ureq::Error::ConnectionFailed);
        // `random` = u64::MAX: the backoff picks its ceiling (backoff::FIRST_WINDOW on a first failure;
        // a `Retry-After` of 0 or in the past still waits the 1 s floor).
        let table: Vec<(Role, Result<Reply, ureq::Error>, &str)> = vec![
            (Events, reply(200, None), "done 200"),
            (Events, reply(401, None), "reauth"),
            (Events, reply(503, None), "resend 10000ms failover"),
            (Events, reply(503, Some("2")), "resend 2000ms"),
            (Events, reply(429, Some("3600")), "resend 60000ms"),
            (Events, reply(408, None), "resend 10000ms"),
            (Events, refused(), "down 10000ms failover"),
            (Events, timeout(), "down 10000ms failover"),
            (Events, reply(400, None), "refused 400 m"),
            (Events, reply(413, None), "refused 413 m"),
            (Events, reply(404, None), "slow 30000ms"),
            (Commands, reply(200, None), "done 200"),
            (Commands, reply(403, None), "reauth"),
            (Commands, reply(408, None), "repoll"),
            (Commands, reply(429, Some("0")), "resend 1000ms"),
            (Commands, reply(503, Some("0")), "resend 1000ms"),
            (Commands, reply(503, Some("Thu, 01 Jan 1970 00:00:00 GMT")), "resend 1000ms"),
            (Commands, reply(408, Some("0")), "resend 1000ms"),
            (Events, reply(503, Some("0")), "resend 1000ms"),
            (Files, reply(429, Some("0")), "resend 1000ms"),
            (Commands, timeout(), "repoll"),
            (Commands, refused(), "down 10000ms failover"),
            (Commands, reply(400, None), "slow 30000ms"),
            (Commands, reply(404, None), "slow 30000ms"),
            (Files, reply(404, None), "refused 404 m"),
            (Files, reply(400, None), "refused 400 m"),
            (Files, timeout(), "down 10000ms failover"),
            (Files, reply(408, None), "resend 10000ms"),
            (Commands, reply(408, Some("2")), "resend 2000ms"),
        ];
        for (role, result, want) in table {
            let mut backoff = Backoff::new(Duration::ZERO, Duration::ZERO);
            let step = next_step(role, result, SystemTime::now(), &retry, &mut backoff, u64::MAX);
            assert_eq!(shape(&step), want, "{role:?}");
        }
    }

    #[test]
    fn backoff_grows_follows_live_limits_and_restarts_after_a_hold() {
        let step = |backoff: &mut Backoff, retry: &RetryConfig, result| {
            shape(&next_step(Role::Commands, result, SystemTime::now(), retry, backoff, u64::MAX))
        };
        let slow = RetryConfig { initial: Duration::from_secs(1), max: Duration::from_secs(60) };
        let fast = RetryConfig { initial: Duration::from_millis(10), max: Duration::from_millis(40) };
        let mut b = Backoff::new(slow.initial, slow.max);
        let down = || Err(ureq::Error::ConnectionFailed);
        assert_eq!(step(&mut b, &slow, down()), "down 10000ms failover");
        // Later failures double from the window (not from `initial`), up to two thirds of `max`.
        assert_eq!(step(&mut b, &slow, down()), "down 20000ms failover");
        assert_eq!(step(&mut b, &slow, down()), "down 40000ms failover");
        assert_eq!(step(&mut b, &slow, down()), "down 40000ms failover");
        // A live `retry.*` change applies to the very next failure.
        assert_eq!(step(&mut b, &fast, down()), "down 40ms failover");
        assert_eq!(step(&mut b, &fast, reply(408, None)), "repoll");
        assert_eq!(step(&mut b, &slow, down()), "down 10000ms failover");
    }

    #[test]
    fn gzip_falls_back_only_when_the_probe_is_taken_after_5xx_in_a_row() {
        // (count before, answer) → (count after, fall back); at GZIP_TRIES the attempt was the uncompressed probe.
        let table: &[(u32, Option<u16>, (u32, bool))] = &[
            (0, Some(500), (1, false)),
            (1, Some(503), (2, false)),
            (2, Some(502), (GZIP_TRIES, false)),
            // The probe taken: the same body uncompressed is fine, gzip is not.
            (GZIP_TRIES, Some(200), (0, true)),
            (GZIP_TRIES, Some(204), (0, true)),
            // The probe refused too (an outage, not gzip) or not answered: start over, keep gzip.
            (GZIP_TRIES, Some(500), (0, false)),
            (GZIP_TRIES, Some(503), (0, false)),
            (GZIP_TRIES, None, (0, false)),
            (GZIP_TRIES, Some(400), (0, false)),
            (GZIP_TRIES, Some(401), (0, false)),
            // Anything but a 5xx breaks the run: no answer, a success, a refusal, a 429.
            (2, None, (0, false)),
            (2, Some(200), (0, false)),
            (2, Some(429), (0, false)),
            (1, Some(401), (0, false)),
            (0, Some(200), (0, false)),
            (0, Some(413), (0, false)),
        ];
        for &(count, status, want) in table {
            assert_eq!(gzip_fallback(count, status), want, "{count} {status:?}");
        }
    }

    fn session(stop: Stop) -> Session {
        let live = Live::new(crate::config::Config::defaults(), String::new());
        let (agent, cell) = (ureq::Agent::new_with_defaults(), TokenCell::new().0);
        Session { agent, cell, live, stats: Arc::new(Stats::default()), stop, role: Role::Events }
    }

    /// Runs `pause(60 s)` in a thread; its answer must come long before the minute is over.
    fn pause_a_minute(s: Session, until: Option<Instant>) -> bool {
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || tx.send(s.pause(Duration::from_secs(60), until)));
        rx.recv_timeout(Duration::from_secs(10)).expect("the wait ended early")
    }

    #[test]
    fn waits_end_at_shutdown_at_the_drain_deadline_and_at_the_callers_deadline() {
        let (open_tx, open) = crossbeam_channel::bounded::<()>(0);
        assert!(session(Stop::Now(open.clone())).pause(Duration::from_millis(1), None), "a short wait ends normally");
        let soon = Some(Instant::now() + Duration::from_millis(100));
        assert!(!pause_a_minute(session(Stop::Now(open.clone())), soon), "the caller's deadline");
        let closed = crossbeam_channel::bounded::<()>(0).1;
        assert!(!pause_a_minute(session(Stop::Now(closed.clone())), None), "shutdown");
        // Draining: the closed channel alone does not stop the wait; the deadline does.
        let deadline = Arc::new(OnceLock::new());
        let draining = session(Stop::Drain { shutdown: closed, deadline: deadline.clone() });
        deadline.set(Instant::now() + Duration::from_millis(200)).unwrap();
        assert!(!draining.stopped(None));
        assert!(!pause_a_minute(draining, None), "the shutdown deadline");
        drop(open_tx);
    }
}
