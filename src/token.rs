//! Token lifecycle (docs/protocol.md, Authentication): authenticate with uuid+key, keep the JWT in memory,
//! renew it before it expires and at once when another thread reports a 401/403. [`decode_claims`] and
//! [`renewal_delay`] are pure; [`TokenCell`] is the shared state; [`run`], the token thread, is the only
//! caller of the authentication endpoint, so at most one authentication is ever in flight.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use crossbeam_channel::{Receiver, Sender, select};
use serde::Deserialize;

use crate::backoff::Backoff;
use crate::credentials::{Credentials, Secret};
use crate::http::{self, Attempt, Outcome, Request};
use crate::live::Live;

/// Renewals are never closer together than this, whatever the token or clock say (no refresh loop).
pub const MIN_RENEWAL: Duration = Duration::from_secs(1);
/// Upper bound of one renewal delay, so a token claiming years of life is still renewed daily.
pub const MAX_RENEWAL: Duration = Duration::from_secs(24 * 3600);
/// The longest lifetime believed from a token's claims (a year): a server may claim any `exp`.
pub const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);
/// Used when the token's claims give no usable lifetime.
pub const FALLBACK_RENEWAL: Duration = Duration::from_secs(60);

/// The claims the agent reads from a JWT (without verifying it: it has no key for that).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Claims {
    pub exp: i64,
    pub iat: Option<i64>,
}

/// Why a token could not be obtained or read.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The JWT is not three base64url parts with a JSON payload carrying `exp`.
    #[error("the server's token is not a readable JWT: {0}")]
    Malformed(&'static str),
    /// The server refused the credentials (401 "Invalid key" / 403 "Agent does not exist").
    #[error(
        "{server} refused the agent's credentials ({status} {message}); all data is kept; \
         if the agent was removed from the server, register again with `wazuh-agent --register --force`"
    )]
    CredentialsRejected { server: String, status: u16, message: String },
    /// No server could be reached, or one answered with a retryable error.
    #[error("cannot authenticate with {server}: {message}")]
    Unavailable { server: String, message: String, retry_after: Option<Duration> },
    #[error("unexpected authentication answer from {server}: {message}")]
    BadAnswer { server: String, message: String },
}

/// Reads `exp`/`iat` from the JWT payload. The signature is not checked.
pub fn decode_claims(jwt: &str) -> Result<Claims, TokenError> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [_header, payload, _sig] = parts[..] else {
        return Err(TokenError::Malformed("not three dot-separated parts"));
    };
    // Tokens are base64url without padding; tolerate padding some servers add.
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed("payload is not base64url"))?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed("payload is not JSON with a numeric exp"))
}

/// The token's lifetime: `exp - iat` when both are sane (a skewed local clock does not matter),
/// else `exp - now`; at most [`MAX_LIFETIME`], so no claim can overflow the clock arithmetic.
pub fn lifetime(claims: &Claims, now_unix: i64) -> Option<Duration> {
    let secs = match claims.iat {
        Some(iat) if claims.exp > iat => claims.exp.saturating_sub(iat),
        _ => claims.exp.saturating_sub(now_unix),
    };
    (secs > 0).then(|| Duration::from_secs(secs as u64).min(MAX_LIFETIME))
}

/// How long after receipt to renew a token (docs/protocol.md, Authentication): at the latest `max(60 s, 10 % of the
/// lifetime)` before expiry but not before half the lifetime, within `MIN_RENEWAL..=MAX_RENEWAL`; `random` picks the
/// point in the last fifth of that window, so agents that authenticated together (after a server restart) renew apart,
/// with short tokens too (a 120 s one between 48 and 60 s), never later than the window's end.
pub fn renewal_delay(claims: &Claims, now_unix: i64, random: u64) -> Duration {
    let Some(life) = lifetime(claims, now_unix) else { return FALLBACK_RENEWAL };
    let margin = Duration::from_secs(60).max(life / 10);
    let latest = life.saturating_sub(margin).max(life / 2).clamp(MIN_RENEWAL, MAX_RENEWAL);
    let spread = (latest / 5).as_millis() as u64;
    let pick = ((random as u128 * (spread as u128 + 1)) >> 64) as u64;
    latest.saturating_sub(Duration::from_millis(pick)).max(MIN_RENEWAL)
}

/// A token in use.
#[derive(Debug)]
pub struct Token {
    pub jwt: Secret,
    /// The comms API base URL that issued it (and that requests should go to).
    pub server: String,
    /// Increases with every token published; reported back by [`TokenCell::refused`].
    pub generation: u64,
    /// When the token expires, by the local clock (receipt time + lifetime).
    pub expires_at: SystemTime,
}

impl Token {
    /// The `Authorization` header value.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.jwt.expose())
    }
}

#[derive(Default)]
struct CellState {
    token: Option<Arc<Token>>,
    generation: u64,
    /// Generation a refresh was requested for; cleared when a newer token is published.
    refresh_for: Option<u64>,
    /// The refresh is to move on to the next server of `server.url` (the current one looks down).
    failover: bool,
    closed: bool,
    last_error: Option<String>,
}

/// The shared token: one writer (the token thread), many readers.
pub struct TokenCell {
    state: Mutex<CellState>,
    changed: Condvar,
    wake: Sender<()>,
}

impl TokenCell {
    /// The cell, and the receiver the token thread selects on for refresh requests.
    pub fn new() -> (Arc<TokenCell>, Receiver<()>) {
        // Capacity 1: one pending wake-up is all that is needed; more would be duplicates.
        let (wake, wake_rx) = crossbeam_channel::bounded(1);
        let cell = TokenCell { state: Mutex::new(CellState::default()), changed: Condvar::new(), wake };
        (Arc::new(cell), wake_rx)
    }

    fn lock(&self) -> MutexGuard<'_, CellState> {
        // A panic while holding this lock aborts the process (panic = "abort" in release),
        // and tests treat it as fatal; a poisoned state is still consistent (plain fields).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn current(&self) -> Option<Arc<Token>> {
        self.lock().token.clone()
    }

    /// The last authentication error (for status), cleared by a success.
    pub fn last_error(&self) -> Option<String> {
        self.lock().last_error.clone()
    }

    /// Waits for a token with a generation above `after` (0: any), the cell's close, or `timeout`.
    pub fn wait_newer(&self, after: u64, timeout: Duration) -> Option<Arc<Token>> {
        let newer = |st: &CellState| st.token.clone().filter(|t| t.generation > after);
        let waiting = |st: &mut CellState| !st.closed && newer(st).is_none();
        let (st, _) = self.changed.wait_timeout_while(self.lock(), timeout, waiting).unwrap_or_else(|p| p.into_inner());
        newer(&st)
    }

    /// Reports that a request made with token `generation` was refused (401/403): one refresh,
    /// unless one is pending for it or a newer token exists. Then [`wait_newer`](Self::wait_newer).
    pub fn refused(&self, generation: u64) {
        self.ask(generation, false);
    }

    /// Reports that the server of token `generation` looks down (no answer, a 5xx without
    /// `Retry-After`): as [`refused`](Self::refused), with the next server of `server.url`.
    pub fn server_down(&self, generation: u64) {
        self.ask(generation, true);
    }

    fn ask(&self, generation: u64, failover: bool) {
        let mut st = self.lock();
        if st.closed || generation < st.generation {
            return;
        }
        st.failover |= failover;
        if st.refresh_for == Some(st.generation) {
            return;
        }
        st.refresh_for = Some(st.generation);
        drop(st);
        // Full: a wake-up is pending. Disconnected: the token thread ended (shutdown); waiters time out or see close().
        let _ = self.wake.try_send(());
    }

    pub(crate) fn publish(&self, jwt: Secret, server: String, expires_at: SystemTime) -> Arc<Token> {
        let mut st = self.lock();
        st.generation += 1;
        let token = Arc::new(Token { jwt, server, generation: st.generation, expires_at });
        st.token = Some(token.clone());
        (st.refresh_for, st.failover, st.last_error) = (None, false, None);
        drop(st);
        self.changed.notify_all();
        token
    }

    /// Wakes every waiter for shutdown; no token is handed out afterwards by `wait_newer`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

/// Talks to `POST /api/v1/authentication`, with failover over `server.url`.
pub struct Authenticator {
    agent: ureq::Agent,
    /// `server.url`, and the index of the one in use: failover moves it on.
    servers: Vec<String>,
    current: usize,
    credentials: Credentials,
}

impl Authenticator {
    pub fn new(agent: ureq::Agent, urls: &[String], credentials: Credentials) -> Authenticator {
        Authenticator { agent, servers: urls.to_vec(), current: 0, credentials }
    }

    fn advance(&mut self) {
        self.current = (self.current + 1) % self.servers.len();
    }

    /// One authentication round: the current server, then the next ones while they look down, at most once each.
    /// `retry_cap` (`retry.max`) caps a `Retry-After`. A fresh token: its JWT, the server that issued it, its claims.
    pub fn authenticate(&mut self, retry_cap: Duration) -> Result<(Secret, String, Claims), TokenError> {
        let (uuid, key) = (&self.credentials.uuid, self.credentials.key.expose());
        let body = serde_json::json!({"uuid": uuid, "key": key}).to_string().into_bytes();
        let mut tried = 0;
        loop {
            let server = self.servers[self.current].clone();
            let url = format!("{server}/api/v1/authentication");
            let result = http::send(&self.agent, &url, None, &Request::Json(&body), None);
            tried += 1;
            let err = match (http::classify(Attempt::of(&result, false), SystemTime::now(), retry_cap), result) {
                (Outcome::Done, Ok(reply)) => {
                    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
                    let Some(token) = body.get("token").and_then(serde_json::Value::as_str) else {
                        let message = format!("{} with a body that has no \"token\"", reply.status);
                        return Err(TokenError::BadAnswer { server, message });
                    };
                    let claims = decode_claims(token)?;
                    return Ok((Secret::new(token.to_string()), server, claims));
                }
                (Outcome::Reauth, Ok(r)) => {
                    return Err(TokenError::CredentialsRejected { server, status: r.status, message: r.message() });
                }
                (Outcome::Retry { after, failover }, result) => {
                    let err = TokenError::Unavailable { server, message: http::describe(&result), retry_after: after };
                    // Looks down (`failover`): try the next server.
                    if failover { err } else { return Err(err) }
                }
                (_, result) => return Err(TokenError::BadAnswer { server, message: http::describe(&result) }),
            };
            self.advance();
            if tried >= self.servers.len() {
                return Err(err);
            }
            log::warn!("{err}; trying the next server");
        }
    }
}

/// The token thread: authenticates at once, then renews on schedule or request until `shutdown`
/// closes; after failures, full-jitter backoff (`retry.*` read live) that refresh requests wait out.
pub fn run(cell: Arc<TokenCell>, wake: Receiver<()>, shutdown: Receiver<()>, mut auth: Authenticator, live: Arc<Live>) {
    let mut backoff = Backoff::new(Duration::ZERO, Duration::ZERO);
    let (mut next_due, mut last_success, mut backing_off) = (Instant::now(), None::<Instant>, false);
    loop {
        let wait = next_due.saturating_duration_since(Instant::now());
        select! {
            recv(shutdown) -> _ => break,
            recv(wake) -> msg => {
                let Ok(()) = msg else { break };
                if !backing_off {
                    let earliest = last_success.map(|t| t + MIN_RENEWAL).unwrap_or_else(Instant::now);
                    next_due = next_due.min(earliest.max(Instant::now()));
                    log::debug!("token refresh requested after a refused request");
                }
                continue;
            }
            default(wait) => {}
        }
        let now = Instant::now();
        let retry = live.config().retry.clone();
        backoff.set_limits(retry.initial, retry.max);
        // Asked once: the next authentication starts with the next server.
        if std::mem::take(&mut cell.lock().failover) {
            log::warn!("requests to {} fail; trying the next server", auth.servers[auth.current]);
            auth.advance();
        }
        match auth.authenticate(retry.max) {
            Ok((jwt, server, claims)) => {
                let unix_now = crate::status::unix(SystemTime::now());
                let delay = renewal_delay(&claims, unix_now, fastrand::u64(..));
                let life = lifetime(&claims, unix_now).unwrap_or(delay);
                if claims.iat.is_none() {
                    log::warn!("the server's token has no iat claim; its lifetime is measured with the local clock");
                }
                let token = cell.publish(jwt, server, SystemTime::now() + life);
                let what = if token.generation == 1 { "authenticated" } else { "token renewed" };
                let (server, secs, ms) = (&token.server, life.as_secs(), delay.as_millis());
                log::info!("{what} with {server} (token lifetime {secs}s, renewal in {ms}ms)");
                backoff.reset();
                (backing_off, last_success, next_due) = (false, Some(now), now + delay);
            }
            Err(e) => {
                let delay = match &e {
                    // Dead credentials do not heal quickly: retry slowly, at the top of the range.
                    TokenError::CredentialsRejected { .. } => {
                        retry.max / 2 + Backoff::new(retry.max / 2, retry.max / 2).next_delay()
                    }
                    // A `Retry-After` never shortens the policy's floor (0 or a past date would spin).
                    TokenError::Unavailable { retry_after: Some(after), .. } => {
                        backoff.next_delay();
                        (*after).max(retry.initial).max(MIN_RENEWAL)
                    }
                    _ => backoff.next_delay(),
                };
                log::error!("{e}; retrying in {}ms", delay.as_millis());
                cell.lock().last_error = Some(e.to_string());
                (backing_off, next_due) = (true, now + delay);
            }
        }
    }
    cell.close();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    impl TokenCell {
        fn take_failover(&self) -> bool {
            std::mem::take(&mut self.lock().failover)
        }

        /// True while a refresh has been requested and not yet satisfied.
        fn refresh_pending(&self) -> bool {
            let st = self.lock();
            st.refresh_for.is_some_and(|g| g == st.generation)
        }
    }

    fn jwt(payload: &str) -> String {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.{}", b(r#"{"alg":"HS256","typ":"JWT"}"#), b(payload), b("sig"))
    }

    #[test]
    fn decodes_claims_without_verifying() {
        let c = decode_claims(&jwt(r#"{"iss":"wazuh","aud":"Wazuh Agent comms API","iat":100,"exp":1000,"uuid":"u"}"#))
            .unwrap();
        assert_eq!(c, Claims { exp: 1000, iat: Some(100) });
        let c = decode_claims(&jwt(r#"{"exp":1000}"#)).unwrap();
        assert_eq!(c.iat, None);
        for bad in ["", "a.b", "a.b.c.d", "a.!!!.c", &jwt("not json"), &jwt(r#"{"iat":1}"#), &jwt(r#"{"exp":"x"}"#)] {
            assert!(decode_claims(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn renewal_table() {
        let now = 1_784_000_000;
        let c = |iat: Option<i64>, exp: i64| Claims { exp, iat };
        let table: &[(Claims, u64)] = &[
            // 15 min token: margin 90 s → renew after 810 s.
            (c(Some(now), now + 900), 810_000),
            // 2 h token: margin 720 s (10 %) → 6480 s.
            (c(Some(now), now + 7200), 6_480_000),
            // 6 s token: margin 60 s would be before half → half, 3 s.
            (c(Some(now), now + 6), 3_000),
            // 3 s token → 1.5 s.
            (c(Some(now), now + 3), 1_500),
            // 1 s token → clamped to MIN_RENEWAL.
            (c(Some(now), now + 1), 1_000),
            // Local clock years off: exp - iat still decides.
            (c(Some(100), 1000), 810_000),
            (c(Some(now + 400_000_000), now + 400_000_900), 810_000),
            // Years-long token: clamped to MAX_RENEWAL.
            (c(Some(0), 4_000_000_000), 86_400_000),
            // exp <= iat: fall back to the local clock (here: exp == now, nothing left).
            (c(Some(now), now), FALLBACK_RENEWAL.as_millis() as u64),
            // iat later than the local now is fine: exp - iat.
            (c(Some(now + 10), now + 900), 801_000),
            // …and without iat, exp - now.
            (c(None, now + 900), 810_000),
            (c(None, now - 5_000_000), FALLBACK_RENEWAL.as_millis() as u64),
        ];
        for (claims, want_ms) in table {
            assert_eq!(renewal_delay(claims, now, 0).as_millis() as u64, *want_ms, "{claims:?}");
        }
    }

    #[test]
    fn renewals_spread_over_the_last_fifth_of_the_window() {
        let now = 1_784_000_000;
        let c = |iat: Option<i64>, exp: i64| Claims { exp, iat };
        // (claims, in ms: latest (random = 0), halfway (u64::MAX / 2), earliest (u64::MAX))
        let table: &[(Claims, [u64; 3])] = &[
            // 1 day token: 77 760 s at the latest (10 % margin), 62 208 s at the earliest.
            (c(Some(now), now + 86_400), [77_760_000, 69_984_000, 62_208_000]),
            // 15 min token: 810 s at the latest, 648 s at the earliest.
            (c(Some(now), now + 900), [810_000, 729_000, 648_000]),
            // 130 s token: latest 70 s, earliest 56 s.
            (c(Some(now), now + 130), [70_000, 63_000, 56_000]),
            // 120 s token: latest 60 s (half: the 60 s margin reaches it), earliest 48 s.
            (c(Some(now), now + 120), [60_000, 54_000, 48_000]),
            // 100 s and 60 s tokens: latest at half the lifetime, spread below it.
            (c(Some(now), now + 100), [50_000, 45_000, 40_000]),
            (c(Some(now), now + 60), [30_000, 27_000, 24_000]),
            // 6 s token: 3 s at the latest, 2.4 s at the earliest.
            (c(Some(now), now + 6), [3_000, 2_700, 2_400]),
            // 1 s token: never below MIN_RENEWAL.
            (c(Some(now), now + 1), [1_000, 1_000, 1_000]),
            // Years-long token: renewed daily, spread over the last fifth of the day.
            (c(Some(0), 4_000_000_000), [86_400_000, 77_760_000, 69_120_000]),
            (c(Some(now), now), [FALLBACK_RENEWAL.as_millis() as u64; 3]),
        ];
        for (claims, want) in table {
            let ms = |random| renewal_delay(claims, now, random).as_millis() as u64;
            assert_eq!([ms(0), ms(u64::MAX / 2), ms(u64::MAX)], *want, "{claims:?}");
        }
    }

    #[test]
    fn extreme_claims_are_clamped_before_any_clock_arithmetic() {
        let now = 1_784_000_000;
        let (max, min) = (i64::MAX, i64::MIN);
        let c = |iat: Option<i64>, exp: i64| Claims { exp, iat };
        let year = MAX_LIFETIME.as_secs();
        // (claims, lifetime in s, renewal delay in ms)
        let table: &[(Claims, Option<u64>, u64)] = &[
            (c(Some(0), max), Some(year), MAX_RENEWAL.as_millis() as u64),
            (c(Some(min), max), Some(year), MAX_RENEWAL.as_millis() as u64),
            (c(None, max), Some(year), MAX_RENEWAL.as_millis() as u64),
            (c(Some(max), min), None, FALLBACK_RENEWAL.as_millis() as u64),
            (c(Some(min), min), None, FALLBACK_RENEWAL.as_millis() as u64),
            (c(Some(max), max), Some(year), MAX_RENEWAL.as_millis() as u64),
            (c(Some(-5), -1), Some(4), 2_000),
            (c(Some(now + 10), now), None, FALLBACK_RENEWAL.as_millis() as u64),
            (c(None, min), None, FALLBACK_RENEWAL.as_millis() as u64),
        ];
        for (claims, life, delay_ms) in table {
            let got = lifetime(claims, now);
            assert_eq!(got.map(|d| d.as_secs()), *life, "{claims:?}");
            let delay = renewal_delay(claims, now, 0);
            assert_eq!(delay.as_millis() as u64, *delay_ms, "{claims:?}");
            assert!(renewal_delay(claims, now, u64::MAX) <= delay, "{claims:?}");
            // What `run` does with them: neither may overflow.
            let _ = (SystemTime::now() + got.unwrap_or(delay), Instant::now() + delay);
        }
    }

    #[test]
    fn refused_requests_one_refresh_per_token() {
        let (cell, wake) = TokenCell::new();
        let t = cell.publish(Secret::new("a".into()), "https://s".into(), SystemTime::now());
        for _ in 0..10 {
            cell.refused(t.generation);
        }
        assert_eq!(wake.try_iter().count(), 1);
        assert!(cell.refresh_pending());
        // A stale report (older token) after a new token is published asks for nothing.
        let t2 = cell.publish(Secret::new("b".into()), "https://s".into(), SystemTime::now());
        assert!(!cell.refresh_pending());
        cell.refused(t.generation);
        assert_eq!(wake.try_iter().count(), 0);
        cell.refused(t2.generation);
        assert_eq!(wake.try_iter().count(), 1);
        // A failover request joins the pending refresh; the token thread takes it once.
        cell.server_down(t2.generation);
        assert_eq!(wake.try_iter().count(), 0);
        assert!(cell.take_failover() && !cell.take_failover());
        cell.server_down(t.generation);
        assert!(!cell.take_failover(), "a stale report asks for nothing");
    }

    #[test]
    fn waiters_wake_on_publish_and_close() {
        let (cell, _wake) = TokenCell::new();
        let c2 = cell.clone();
        let waiter = std::thread::spawn(move || c2.wait_newer(0, Duration::from_secs(30)).map(|t| t.generation));
        cell.publish(Secret::new("a".into()), "https://s".into(), SystemTime::now());
        assert_eq!(waiter.join().unwrap(), Some(1));
        let c3 = cell.clone();
        let waiter = std::thread::spawn(move || c3.wait_newer(1, Duration::from_secs(30)).is_none());
        cell.close();
        assert!(waiter.join().unwrap());
    }

    #[test]
    fn failover_wraps() {
        let creds = Credentials { uuid: "u".into(), key: Secret::new("k".into()), name: "n".into() };
        let urls = ["https://a".to_string(), "https://b".to_string()];
        let mut auth = Authenticator::new(ureq::Agent::new_with_defaults(), &urls, creds);
        for want in [1, 0, 1] {
            auth.advance();
            assert_eq!(auth.current, want);
        }
    }

    #[test]
    fn bearer_is_not_in_debug_output() {
        let t =
            Token { jwt: Secret::new("eyJsecret".into()), server: "s".into(), generation: 1, expires_at: UNIX_EPOCH };
        assert!(!format!("{t:?}").contains("eyJsecret"));
        assert_eq!(t.bearer(), "Bearer eyJsecret");
    }
}
