//! The command long-poll thread: keeps one `GET /api/v1/commands` open (docs/protocol.md, Commands) on its own
//! connection, and hands what arrives to the executor. Its session retries failures and refusals. A 200 with a broken
//! body is logged and counted; polling goes on. A 200 in under [`MIN_HOLD`] without a new command waits
//! `retry.initial`, as a quick 408 does in the session: no tight loop on a server answering at once; else poll at once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select_biased};

use crate::backoff::Backoff;
use crate::commands::{self, Command, MAX_PER_ANSWER};
use crate::http::{MAX_COMMANDS_BYTES, Request};
use crate::session::{Call, MIN_HOLD, Session};
use crate::status::Stats;

/// Forwarded ids remembered, so an answer repeating one brings nothing new (a scan: 100 x 1000 short ids).
const RECENT: usize = 1000;

/// The poll thread; `session` is a commands session (its own connection, bounded by `server.commands_timeout`).
pub fn run(session: Session, uuid: &str, out: Sender<Command>, shutdown: Receiver<()>) {
    let request = Request::GetAtMost(MAX_COMMANDS_BYTES);
    let call = Call { path: "/api/v1/commands", request, what: "command poll", until: None };
    // Only for answers the server took but the agent cannot read; failures back off in the session.
    let mut unreadable = Backoff::new(Duration::ZERO, Duration::ZERO);
    let mut recent = VecDeque::new();
    loop {
        let sent = Instant::now();
        let Ok(reply) = session.call(&call) else { break };
        match commands::parse_body(&reply.body, uuid) {
            Ok(parsed) => {
                unreadable.reset();
                if parsed.left > 0 {
                    log::warn!("{} commands of this answer beyond the first {MAX_PER_ANSWER} are not run", parsed.left);
                }
                for why in &parsed.skipped {
                    log::warn!("skipped a malformed command: {why}");
                    Stats::add(&session.stats.commands_failed, 1);
                }
                let new = parsed.commands.iter().any(|c| !recent.contains(&c.document_id));
                recent.extend(parsed.commands.iter().map(|c| c.document_id.clone()));
                recent.drain(..recent.len().saturating_sub(RECENT));
                for c in parsed.commands {
                    Stats::add(&session.stats.commands_received, 1);
                    log::debug!("command {} ({}) received", c.document_id, c.action.name());
                    // Handing over first: at shutdown the executor stores what it cannot run.
                    select_biased! {
                        send(out, c) -> r => if r.is_err() { return },
                        recv(shutdown) -> _ => return,
                    }
                }
                if !new && sent.elapsed() < MIN_HOLD && !session.pause(session.live.config().retry.initial, None) {
                    break;
                }
            }
            Err(why) => {
                Stats::add(&session.stats.commands_failed, 1);
                let retry = session.live.config().retry.clone();
                unreadable.set_limits(retry.initial, retry.max);
                let d = unreadable.next_delay();
                log::warn!("unusable commands answer: {why}; polling again in {}ms", d.as_millis());
                session.stats.set_error(format!("commands answer: {why}"));
                if !session.pause(d, None) {
                    break;
                }
            }
        }
    }
}
