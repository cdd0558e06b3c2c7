//! The command long-poll thread: keeps one `GET /api/v1/commands` open at all times
//! (docs/protocol.md, Commands) on its own connection, and hands what arrives to the executor.
//!
//! A 408 or a client-side timeout is the normal idle cycle: poll again at once. Errors
//! back off with full jitter (the first retry included, so a fleet does not stampede a
//! restarted server). A 200 with a broken body is logged and counted; polling goes on.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, Sender, select};

use crate::backoff::Backoff;
use crate::commands::{self, Command};
use crate::http::{self, Attempt, Outcome};
use crate::live::Live;
use crate::status::Stats;
use crate::token::TokenCell;

pub struct Poller {
    /// Built with `server.commands_timeout` as its bound; used by this thread only.
    pub agent: ureq::Agent,
    pub cell: Arc<TokenCell>,
    pub live: Arc<Live>,
    pub stats: Arc<Stats>,
    pub uuid: String,
}

/// Sleeps `d` unless shutdown comes first; returns false on shutdown.
fn pause(shutdown: &Receiver<()>, d: Duration) -> bool {
    select! {
        recv(shutdown) -> _ => false,
        default(d) => true,
    }
}

pub fn run(p: Poller, out: Sender<Command>, shutdown: Receiver<()>) {
    let retry = p.live.config().retry.clone();
    let mut backoff = Backoff::new(retry.initial, retry.max);
    loop {
        if !matches!(shutdown.try_recv(), Err(crossbeam_channel::TryRecvError::Empty)) {
            break;
        }
        let token = match p.cell.current() {
            Some(t) => t,
            None => {
                p.cell.wait_newer(0, Duration::from_secs(1));
                continue;
            }
        };
        let url = format!("{}/api/v1/commands", token.server);
        let result = http::send(&p.agent, "GET", &url, Some(&token.bearer()), None);
        if result.is_err() && !matches!(shutdown.try_recv(), Err(crossbeam_channel::TryRecvError::Empty)) {
            // The supervisor cut the held poll to stop: not a failure.
            break;
        }
        if let Err(ureq::Error::Timeout(_)) = &result {
            // Our own bound (commands_timeout) ended the hold: the normal idle cycle.
            backoff.reset();
            continue;
        }
        let cap = p.live.config().retry.max;
        match http::classify(Attempt::of(&result), SystemTime::now(), cap) {
            Outcome::Done => {
                let Ok(reply) = &result else { continue };
                match commands::parse_body(&reply.body, &p.uuid) {
                    Ok(parsed) => {
                        backoff.reset();
                        for why in &parsed.skipped {
                            log::warn!("skipped a malformed command: {why}");
                            Stats::add(&p.stats.commands_failed, 1);
                        }
                        for c in parsed.commands {
                            Stats::add(&p.stats.commands_received, 1);
                            log::debug!("command {} ({}) received", c.document_id, c.action.name());
                            select! {
                                send(out, c) -> r => if r.is_err() { return },
                                recv(shutdown) -> _ => return,
                            }
                        }
                    }
                    Err(why) => {
                        Stats::add(&p.stats.commands_failed, 1);
                        let d = backoff.next_delay();
                        log::warn!("unusable commands answer from {url}: {why}; polling again in {}ms", d.as_millis());
                        p.stats.set_error(format!("{url}: {why}"));
                        if !pause(&shutdown, d) {
                            break;
                        }
                    }
                }
            }
            // 408: the server's hold ended without commands. Poll again at once.
            Outcome::Retry { after: Some(d), .. } if d.is_zero() => backoff.reset(),
            Outcome::Retry { after, .. } => {
                let why = match &result {
                    Ok(r) => format!("{} {}", r.status, r.message()),
                    Err(e) => {
                        p.stats.connected.store(false, Ordering::Relaxed);
                        http::describe_transport(e)
                    }
                };
                let d = after.unwrap_or_else(|| backoff.next_delay());
                log::warn!("command poll failed ({why}); polling again in {}ms", d.as_millis());
                if !pause(&shutdown, d) {
                    break;
                }
            }
            Outcome::Reauth => {
                p.cell.refused(token.generation);
                p.cell.wait_newer(token.generation, Duration::from_secs(30));
            }
            Outcome::Reject(r) => {
                let d = backoff.next_delay().max(cap / 2);
                let msg = result.as_ref().map(|r| r.message()).unwrap_or_default();
                log::error!("{url} refused the command poll ({r:?}: {msg}); polling again in {}ms", d.as_millis());
                p.stats.set_error(format!("{url}: {msg}"));
                if !pause(&shutdown, d) {
                    break;
                }
            }
        }
    }
}
