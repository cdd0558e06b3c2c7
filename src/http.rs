//! The HTTPS layer: builds every ureq agent from [`ServerConfig`] (the same TLS, proxy, timeouts and
//! User-Agent everywhere; one per thread, ARCHITECTURE.md), sends requests, and classifies every outcome.

use std::io::{ErrorKind, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConnection, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme, StreamOwned};
use rustls_pki_types::pem::PemObject;
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{
    Buffers, ConnectProxyConnector, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, TcpConnector,
    Transport, TransportAdapter,
};

use crate::config::{ServerConfig, Verify};
use crate::event::{BodyReader, Event};

/// Largest response body the agent reads: real answers are small; this bounds memory against a hostile server.
pub const MAX_RESPONSE_BYTES: u64 = 8 << 20;
/// Largest commands answer ([`Request::GetAtMost`]): far more than `commands::MAX_PER_ANSWER` take; bounds its JSON.
pub const MAX_COMMANDS_BYTES: u64 = 1 << 20;

/// Why an HTTP agent could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot read server.ca_file {}: {source}", path.display())]
    CaFile { path: PathBuf, source: std::io::Error },
    #[error("server.ca_file {} holds no PEM certificate", path.display())]
    CaFileEmpty { path: PathBuf },
    /// The TLS configuration could not be assembled (no usable roots, provider failure).
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    /// `server.proxy` was refused by the HTTP client.
    #[error("server.proxy is not usable: {0}")]
    Proxy(String),
}

/// `wazuh-agent-rs/<version> (<arch>; <os>)`, as docs/protocol.md, Transport, says.
pub fn user_agent() -> String {
    format!("wazuh-agent-rs/{} ({}; {})", crate::VERSION, std::env::consts::ARCH, std::env::consts::OS)
}

/// Builds the rustls client configuration for `verify`/`ca_file`.
pub fn tls_config(server: &ServerConfig) -> Result<Arc<ClientConfig>, HttpError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions();
    let builder = builder.map_err(|e| HttpError::Tls(e.to_string()))?;

    let mut roots = RootCertStore::empty();
    match &server.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| HttpError::CaFile { path: path.clone(), source })?;
            let (added, _ignored) =
                roots.add_parsable_certificates(CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok));
            if added == 0 {
                return Err(HttpError::CaFileEmpty { path: path.clone() });
            }
        }
        #[cfg(feature = "webpki-roots")]
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        // --check-config refuses this too (config::NEEDS); registration gets here first.
        #[cfg(not(feature = "webpki-roots"))]
        None => return Err(HttpError::Tls("server.ca_file is empty and this build has no built-in roots".into())),
    }

    if server.verify == Verify::Full {
        return Ok(Arc::new(builder.with_root_certificates(roots).with_no_client_auth()));
    }
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build();
    let inner = inner.map_err(|e| HttpError::Tls(e.to_string()))?;
    let verifier = Lenient { inner, any: server.verify == Verify::None };
    Ok(Arc::new(builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()))
}

/// A ureq agent whose `timeout` bounds one whole call (the long-poll's: `commands_timeout`, others' `request_timeout`).
pub fn build_agent(server: &ServerConfig, timeout: Duration) -> Result<ureq::Agent, HttpError> {
    build_agents(server, [timeout]).map(|[agent]| agent)
}

/// One agent (own connection pool) per timeout, all sharing one TLS configuration (mostly the root store).
pub fn build_agents<const N: usize>(
    server: &ServerConfig,
    timeouts: [Duration; N],
) -> Result<[ureq::Agent; N], HttpError> {
    let tls = tls_config(server)?;
    let proxy =
        server.proxy.as_deref().map(ureq::Proxy::new).transpose().map_err(|e| HttpError::Proxy(e.to_string()))?;
    Ok(timeouts.map(|timeout| {
        let config = ureq::Agent::config_builder()
            // Statuses are data for classify(), not errors.
            .http_status_as_error(false)
            // Redirects are never part of the Wazuh APIs; following one could leak the token.
            .max_redirects(0)
            // Explicit: ureq would otherwise read *_PROXY from the environment.
            .proxy(proxy.clone())
            .user_agent(user_agent())
            .timeout_global(Some(timeout))
            // A dead address must fail fast so failover can move on to the next server.
            .timeout_connect(Some(timeout.min(Duration::from_secs(10))))
            // Keep-alive: one idle connection per server is all a thread needs.
            .max_idle_connections(2)
            .max_idle_connections_per_host(1)
            // Servers (and load balancers) drop idle connections after ~60 s; reconnect sooner.
            .max_idle_age(Duration::from_secs(50))
            // Small buffers: the agent runs on small hosts; bodies are streamed from memory.
            .input_buffer_size(16 * 1024)
            .output_buffer_size(16 * 1024)
            .build();
        let tls = TlsConnector { config: tls.clone() };
        let connector = ().chain(ConnectProxyConnector::default()).chain(TcpConnector::default()).chain(tls);
        ureq::Agent::with_parts(config, connector, DefaultResolver::default())
    }))
}

/// A response read to the end (bounded by [`MAX_RESPONSE_BYTES`] or the request's own limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    /// The server's explanation, for error messages.
    pub fn message(&self) -> String {
        server_message(&self.body)
    }
}

/// What to send: a GET, or a POST and its body.
#[derive(Debug, Clone)]
pub enum Request<'a> {
    Get,
    /// A GET whose answer may be at most this many bytes (more: `ureq::Error::BodyExceedsLimit`).
    GetAtMost(u64),
    /// A POST without a body.
    Post,
    Json(&'a [u8]),
    /// The plain events body, streamed with an explicit Content-Length (else ureq sends it chunked).
    Events(&'a str, &'a [Event]),
    Gzip(Vec<u8>, &'a str, &'a [Event]), // and the plain body's parts, for the gzip fallback (session.rs)
}

/// The one request builder: sends one request and reads the reply; `timeout` ends it sooner (a deadline is near).
pub fn send(
    agent: &ureq::Agent,
    url: &str,
    authorization: Option<&str>,
    request: &Request<'_>,
    timeout: Option<Duration>,
) -> Result<Reply, ureq::Error> {
    let timeout = timeout.or(agent.config().timeouts().global);
    let get = || with_auth(agent.get(url), authorization).config().timeout_global(timeout).build();
    let post = || with_auth(agent.post(url), authorization).config().timeout_global(timeout).build();
    let json = || post().header("Content-Type", "application/json");
    let mut response = match request {
        Request::Get | Request::GetAtMost(_) => get().call()?,
        Request::Post => post().send_empty()?,
        Request::Json(b) => json().send(*b)?,
        Request::Gzip(z, ..) => json().header("Content-Encoding", "gzip").send(z)?,
        Request::Events(agent_line, events) => {
            let mut reader = BodyReader::new(agent_line, events);
            let len = BodyReader::len(agent_line, events).to_string();
            json().header("Content-Length", len).send(ureq::SendBody::from_reader(&mut reader))?
        }
    };
    // Read to the end (bounded), so that the connection goes back to the pool.
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(|s| s.to_string());
    let limit = if let Request::GetAtMost(n) = request { *n } else { MAX_RESPONSE_BYTES };
    let body = response.body_mut().with_config().limit(limit).read_to_vec()?;
    Ok(Reply { status, retry_after, body })
}

fn with_auth<B>(req: ureq::RequestBuilder<B>, authorization: Option<&str>) -> ureq::RequestBuilder<B> {
    authorization.into_iter().fold(req, |req, a| req.header("Authorization", a))
}

/// What a caller does next with the request it just made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the server took it.
    Done,
    /// Send the same request again: after `after` if the server said so (capped; the caller raises it to
    /// `retry.initial`), else after its backoff. `failover`: try the next `server.url` first (this one looks down).
    Retry { after: Option<Duration>, failover: bool },
    /// A long-poll's hold ended (its 408, or our timeout) without a `Retry-After`: poll again at once.
    Repoll,
    /// 401/403: the token was refused; re-authenticate, then resend.
    Reauth,
    /// The server will never take this request as it is.
    Reject(Rejection),
}

/// Kinds of final refusal, so callers can split (413) or bisect (400) a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// 400: malformed; resending the same body fails again.
    Invalid,
    /// 413: the body is too large; to a download (status 413 then), the answer is over its limit.
    TooLarge,
    /// Any other status the agent cannot act on (404, 405, 3xx …).
    Other(u16),
}

/// What happened to one attempt, reduced to what [`classify`] needs.
#[derive(Debug, Clone, Copy)]
pub enum Attempt<'a> {
    /// The server answered with `code` (and maybe a `Retry-After` header).
    Status { code: u16, retry_after: Option<&'a str> },
    /// No answer: connect, TLS, timeout, reset, protocol error.
    Transport,
    /// A long-poll's hold ended (its 408, or our own timeout): the normal idle cycle.
    HoldEnded { retry_after: Option<&'a str> },
}

impl<'a> Attempt<'a> {
    /// `held`: the request is a long-poll, so a 408 or a client-side timeout is the end of
    /// its hold; to any other request a 408 is a failure (a proxy's, say) like a 5xx.
    pub fn of(result: &'a Result<Reply, ureq::Error>, held: bool) -> Attempt<'a> {
        match result {
            Ok(r) if held && r.status == 408 => Attempt::HoldEnded { retry_after: r.retry_after.as_deref() },
            Ok(r) => Attempt::Status { code: r.status, retry_after: r.retry_after.as_deref() },
            Err(ureq::Error::Timeout(_)) if held => Attempt::HoldEnded { retry_after: None },
            Err(_) => Attempt::Transport,
        }
    }
}

/// The one place that maps an attempt to what to do next (pure): a `Retry-After` HTTP-date is
/// measured against `now`, and no server makes the agent wait longer than `cap` (`retry.max`).
pub fn classify(attempt: Attempt<'_>, now: SystemTime, cap: Duration) -> Outcome {
    let after = |retry_after: Option<&str>| retry_after.and_then(|v| parse_retry_after(v, now)).map(|d| d.min(cap));
    let (code, after) = match attempt {
        Attempt::Transport => return Outcome::Retry { after: None, failover: true },
        // The hold ended: poll again at once, or when the server says (that is a Retry-After).
        Attempt::HoldEnded { retry_after: None } => return Outcome::Repoll,
        Attempt::HoldEnded { retry_after } => return Outcome::Retry { after: after(retry_after), failover: false },
        Attempt::Status { code, retry_after } => (code, after(retry_after)),
    };
    match code {
        200..=299 => Outcome::Done,
        401 | 403 => Outcome::Reauth,
        // Someone gave up waiting (a proxy, say): resending at once could loop, so back off.
        408 | 429 => Outcome::Retry { after, failover: false },
        400 => Outcome::Reject(Rejection::Invalid),
        413 => Outcome::Reject(Rejection::TooLarge),
        // A server that names a time to come back is alive: wait for it, do not fail over.
        500..=599 => Outcome::Retry { after, failover: after.is_none() },
        other => Outcome::Reject(Rejection::Other(other)),
    }
}

/// `Retry-After` is either delta-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    let date = || httpdate::parse_http_date(v).ok().map(|at| at.duration_since(now).unwrap_or(Duration::ZERO));
    v.parse().ok().map(Duration::from_secs).or_else(date)
}

/// A short message from an error body: a JSON `message`/`title`/`detail`, or the text; at most 200 characters.
pub fn server_message(body: &[u8]) -> String {
    let from_json = serde_json::from_slice::<serde_json::Value>(body).ok().and_then(|v| {
        let field = |k: &str| v.get(k).and_then(|m| m.as_str()).filter(|m| !m.is_empty());
        match (field("message"), field("title"), field("detail")) {
            (Some(m), _, _) => Some(m.to_string()),
            // The management API answers {"title": "Bad Request", "detail": "<the reason>"}.
            (None, Some(t), Some(d)) => Some(format!("{t}: {d}")),
            (None, t, d) => t.or(d).or_else(|| field("error")).map(str::to_string),
        }
    });
    let text = from_json.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let out: String = one_line.chars().take(200).collect();
    if out.is_empty() { "(empty body)".into() } else { out }
}

/// One line for logs: the status and the server's message, or what went wrong on the way.
pub fn describe(result: &Result<Reply, ureq::Error>) -> String {
    match result {
        Ok(r) => format!("{} {}", r.status, r.message()),
        Err(e) => describe_transport(e),
    }
}

/// A transport error in one line for logs, with what to do about the TLS failures operators meet most.
pub fn describe_transport(e: &ureq::Error) -> String {
    let text = match e {
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::Io(io) if io.kind() == ErrorKind::ConnectionRefused => "connection refused".into(),
        ureq::Error::Io(io) if io.kind() == ErrorKind::ConnectionReset => "connection reset by the server".into(),
        ureq::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    };
    if text.contains("UnknownIssuer") {
        format!("{text} (the server's CA is not trusted: set server.ca_file)")
    } else if text.contains("not valid for name") {
        format!("{text} (use a host name the certificate has, or server.verify = \"certificate\")")
    } else {
        text
    }
}

// TLS connector: ureq's own rustls connector cannot check "chain but not name", so the
// agent wraps connections itself with the ClientConfig built above.

#[derive(Debug)]
struct TlsConnector {
    config: Arc<ClientConfig>,
}

impl<In: Transport> Connector<In> for TlsConnector {
    type Out = Either<In, TlsTransport>;

    fn connect(&self, details: &ConnectionDetails, chained: Option<In>) -> Result<Option<Self::Out>, ureq::Error> {
        let Some(transport) = chained else { return Err(ureq::Error::ConnectionFailed) };
        if !details.needs_tls() || transport.is_tls() {
            return Ok(Some(Either::A(transport)));
        }
        let host = details.uri.host().ok_or(ureq::Error::Tls("URL has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string()).map_err(|_| ureq::Error::Tls("invalid server name"))?;
        let mut conn =
            ClientConnection::new(self.config.clone(), name).map_err(|e| ureq::Error::Io(std::io::Error::other(e)))?;
        let mut sock = TransportAdapter::new(transport.boxed(), details.current_time.clone());
        sock.set_timeout(details.timeout);
        conn.complete_io(&mut sock)?;
        let buffers = LazyBuffers::new(details.config.input_buffer_size(), details.config.output_buffer_size());
        Ok(Some(Either::B(TlsTransport { buffers, stream: StreamOwned { conn, sock } })))
    }
}

struct TlsTransport {
    buffers: LazyBuffers,
    stream: StreamOwned<ClientConnection, TransportAdapter>,
}

impl std::fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsTransport")
    }
}

impl Transport for TlsTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.stream.get_mut().set_timeout(timeout);
        self.stream.write_all(&self.buffers.output()[..amount])?;
        Ok(self.stream.flush()?)
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.stream.get_mut().set_timeout(timeout);
        let n = self.stream.read(self.buffers.input_append_buf())?;
        self.buffers.input_appended(n);
        Ok(n > 0)
    }

    fn is_open(&mut self) -> bool {
        self.stream.get_mut().get_mut().is_open()
    }

    fn is_tls(&self) -> bool {
        true
    }
}

/// `verify = "certificate"`: the full WebPKI check, name mismatch excepted; `verify = "none"` (`any`):
/// any certificate. Both check the handshake signatures (the peer holds the presented key).
#[derive(Debug)]
struct Lenient {
    inner: Arc<WebPkiServerVerifier>,
    any: bool,
}

type Signed = Result<HandshakeSignatureValid, rustls::Error>;

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(_) if self.any => Ok(ServerCertVerified::assertion()),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Signed {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Signed {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_table() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_784_000_000);
        let in_90s = httpdate::fmt_http_date(now + Duration::from_secs(90));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        let cap = Duration::from_secs(60);
        let s = |code, ra| Attempt::Status { code, retry_after: ra };
        let retry = |secs: Option<u64>, failover| Outcome::Retry { after: secs.map(Duration::from_secs), failover };
        let table: Vec<(Attempt, Outcome)> = vec![
            (Attempt::Transport, retry(None, true)),
            (Attempt::HoldEnded { retry_after: None }, Outcome::Repoll),
            (Attempt::HoldEnded { retry_after: Some("5") }, retry(Some(5), false)),
            // A Retry-After of 0 or in the past is passed on as 0: the caller's floor applies.
            (Attempt::HoldEnded { retry_after: Some("0") }, retry(Some(0), false)),
            (s(503, Some("0")), retry(Some(0), false)),
            (s(503, Some(&past)), retry(Some(0), false)),
            (s(503, Some("18446744073709551615")), retry(Some(60), false)),
            (s(200, None), Outcome::Done),
            (s(201, None), Outcome::Done),
            (s(204, None), Outcome::Done),
            (s(401, None), Outcome::Reauth),
            (s(403, None), Outcome::Reauth),
            // Not a long-poll's hold: a 408 backs off (or waits as told), never "at once".
            (s(408, None), retry(None, false)),
            (s(408, Some("3")), retry(Some(3), false)),
            (s(429, None), retry(None, false)),
            (s(429, Some("7")), retry(Some(7), false)),
            (s(429, Some("3600")), retry(Some(60), false)),
            (s(429, Some(&in_90s)), retry(Some(60), false)),
            (s(429, Some(&past)), retry(Some(0), false)),
            (s(429, Some("soon")), retry(None, false)),
            (s(503, Some("2")), retry(Some(2), false)),
            (s(503, None), retry(None, true)),
            (s(500, None), retry(None, true)),
            (s(502, None), retry(None, true)),
            (s(400, None), Outcome::Reject(Rejection::Invalid)),
            (s(413, None), Outcome::Reject(Rejection::TooLarge)),
            (s(404, None), Outcome::Reject(Rejection::Other(404))),
            (s(302, None), Outcome::Reject(Rejection::Other(302))),
            (s(100, None), Outcome::Reject(Rejection::Other(100))),
        ];
        for (attempt, want) in table {
            assert_eq!(classify(attempt, now, cap), want, "{attempt:?}");
        }
    }

    #[test]
    fn retry_after_date_is_measured_from_now() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_784_000_000);
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after(" 5 ", now), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn server_messages() {
        let table: &[(&[u8], &str)] = &[
            (br#"{"message": "Invalid key", "code": 401}"#, "Invalid key"),
            (br#"{"title": "Bad Request", "detail": "x"}"#, "Bad Request: x"),
            (br#"{"detail": "only detail"}"#, "only detail"),
            (b"plain\ntext  here", "plain text here"),
            (b"", "(empty body)"),
        ];
        for (body, want) in table {
            assert_eq!(server_message(body), *want);
        }
        assert_eq!(server_message(&[b'x'; 1000]).len(), 200);
    }

    #[test]
    fn user_agent_shape() {
        let ua = user_agent();
        assert!(ua.starts_with("wazuh-agent-rs/") && ua.contains(" (") && ua.ends_with(')'), "{ua}");
    }
}
