//! The command long-poll thread: keeps one `GET /api/v1/commands` open at all times
//! (docs/protocol.md, Commands) on its own connection, and hands what arrives to the executor.
//!
//! A 408 or a client-side timeout is the normal idle cycle: poll again at once. Errors
//! back off with full jitter (the first retry included, so a fleet does not stampede a
//! restarted server). A 200 with a broken body is logged and counted; polling goes on.

use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, select};

use crate::backoff::Backoff;
use crate::commands::{self, Command, MAX_PER_ANSWER};
use crate::http::{MAX_COMMANDS_BYTES, Request};
use crate::session::{Call, Session};
use crate::status::Stats;

pub struct Poller {
    /// A commands session (its own connection, bounded by `server.commands_timeout`).
    pub session: Session,
    pub uuid: String,
}

pub fn run(p: Poller, out: Sender<Command>, shutdown: Receiver<()>) {
    let call = Call {
        path: "/api/v1/commands",
        request: Request::GetAtMost(MAX_COMMANDS_BYTES),
        what: "command poll",
        until: None,
    };
    // Only for answers the server took but the agent cannot read; failures back off in the session.
    let mut unreadable = Backoff::new(Duration::ZERO, Duration::ZERO);
    // The session retries every failure and refusal itself: it ends only with a reply or a stop.
    while let Ok(reply) = p.session.call(&call) {
        match commands::parse_body(&reply.body, &p.uuid) {
            Ok(parsed) => {
                unreadable.reset();
                if parsed.left > 0 {
                    log::warn!("{} commands of this answer beyond the first {MAX_PER_ANSWER} are not run", parsed.left);
                }
                for why in &parsed.skipped {
                    log::warn!("skipped a malformed command: {why}");
                    Stats::add(&p.session.stats.commands_failed, 1);
                }
                for c in parsed.commands {
                    Stats::add(&p.session.stats.commands_received, 1);
                    log::debug!("command {} ({}) received", c.document_id, c.action.name());
                    select! {
                        send(out, c) -> r => if r.is_err() { return },
                        recv(shutdown) -> _ => return,
                    }
                }
            }
            Err(why) => {
                Stats::add(&p.session.stats.commands_failed, 1);
                let retry = p.session.live.config().retry.clone();
                unreadable.set_limits(retry.initial, retry.max);
                let d = unreadable.next_delay();
                log::warn!("unusable commands answer: {why}; polling again in {}ms", d.as_millis());
                p.session.stats.set_error(format!("commands answer: {why}"));
                if !p.session.pause(d, None) {
                    break;
                }
            }
        }
    }
}
