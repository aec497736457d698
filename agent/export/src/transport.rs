//! HTTP(S) POSTs to one backend: TLS with the system's roots or a CA file, credentials,
//! Pyroscope's tenant header, a timeout; each answer sorted into sent, rejected or retry.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

use crate::Error;

/// Credentials sent with every request.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// `Authorization: Bearer TOKEN`.
    Bearer(String),
    /// `Authorization: Basic base64(USER:PASSWORD)`.
    Basic {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Bearer(_) => f.write_str("Bearer(…)"),
            Auth::Basic { user, .. } => write!(f, "Basic({user}:…)"),
        }
    }
}

impl Auth {
    /// A bearer token from the text of a file or variable (surrounding white space
    /// ignored); `what` names the source in errors.
    pub fn bearer(text: &str, what: &str) -> Result<Auth, Error> {
        let token = text.trim();
        if token.is_empty() || token.contains(['\n', '\r']) {
            return Err(Error::Credentials { origin: what.to_string(), reason: "expected one token".into() });
        }
        Ok(Auth::Bearer(token.to_string()))
    }

    /// Basic credentials from `USER:PASSWORD` text.
    pub fn basic(text: &str, what: &str) -> Result<Auth, Error> {
        let line = text.trim();
        match line.split_once(':') {
            Some((user, password)) if !user.is_empty() && !line.contains(['\n', '\r']) => {
                Ok(Auth::Basic { user: user.to_string(), password: password.to_string() })
            }
            _ => {
                Err(Error::Credentials { origin: what.to_string(), reason: "expected USER:PASSWORD".into() })
            }
        }
    }

    fn header(&self) -> String {
        match self {
            Auth::Bearer(t) => format!("Bearer {t}"),
            Auth::Basic { user, password } => {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
                )
            }
        }
    }
}

/// CA certificates to trust (read by [`read_ca_file`]).
#[derive(Clone, Debug)]
pub struct CaCertificates(Arc<Vec<Certificate<'static>>>);

/// How to reach a backend.
#[derive(Clone, Debug)]
pub struct TransportOptions {
    /// PEM certificates to trust instead of the system's roots.
    pub ca_certificates: Option<CaCertificates>,
    /// Credentials.
    pub auth: Option<Auth>,
    /// `X-Scope-OrgID` (Pyroscope's tenant).
    pub tenant: Option<String>,
    /// Longest time one request may take, connecting included.
    pub timeout: Duration,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions { ca_certificates: None, auth: None, tenant: None, timeout: Duration::from_secs(10) }
    }
}

/// Reads the PEM certificates of a CA file.
pub fn read_ca_file(path: &Path) -> Result<CaCertificates, Error> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::CaFile { path: path.to_owned(), reason: e.to_string() })?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&bytes) {
        match item {
            Ok(PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => return Err(Error::CaFile { path: path.to_owned(), reason: e.to_string() }),
        }
    }
    if certs.is_empty() {
        return Err(Error::CaFile { path: path.to_owned(), reason: "no PEM certificate in it".into() });
    }
    Ok(CaCertificates(Arc::new(certs)))
}

/// A backend's base URL: `http` or `https`, a host, an optional path prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseUrl(String);

impl BaseUrl {
    /// Checks `url`.
    ///
    /// ```
    /// assert!(unwound_export::BaseUrl::parse("https://pyroscope.example:4040").is_ok());
    /// assert!(unwound_export::BaseUrl::parse("ftp://x").is_err());
    /// assert!(unwound_export::BaseUrl::parse("http://").is_err());
    /// ```
    pub fn parse(url: &str) -> Result<BaseUrl, Error> {
        let bad = |reason: &str| Error::BadUrl { url: url.to_string(), reason: reason.to_string() };
        let uri: ureq::http::Uri =
            url.parse().map_err(|e: ureq::http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(bad("expected http:// or https://")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        if uri.query().is_some() {
            return Err(bad("a query is not allowed"));
        }
        Ok(BaseUrl(url.trim_end_matches('/').to_string()))
    }

    /// The URL as given, without a trailing `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What became of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// 2xx.
    Sent,
    /// A 4xx other than 429: the backend will never take it.
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The start of the answer's body.
        message: String,
    },
    /// 429, 5xx, or no answer (refused, timed out, TLS failure): worth sending again.
    Retry {
        /// What went wrong.
        reason: String,
        /// The server's `Retry-After`, if it sent one.
        after: Option<Duration>,
    },
}

/// Sends requests to one backend; shared by the exporter's thread.
#[derive(Debug)]
pub struct Transport {
    agent: ureq::Agent,
    base: BaseUrl,
    options: TransportOptions,
}

impl Transport {
    /// A transport to `base`.
    pub fn new(base: BaseUrl, options: TransportOptions) -> Transport {
        let roots = match &options.ca_certificates {
            Some(certs) => RootCerts::Specific(Arc::clone(&certs.0)),
            None => RootCerts::PlatformVerifier,
        };
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(options.timeout))
            .http_status_as_error(false)
            .user_agent(concat!("unwound/", env!("CARGO_PKG_VERSION")))
            .tls_config(TlsConfig::builder().root_certs(roots).build())
            .build();
        Transport { agent: config.into(), base, options }
    }

    /// The backend's URL.
    pub fn base(&self) -> &BaseUrl {
        &self.base
    }

    /// POSTs `body` to the base URL followed by `path_and_query`.
    pub fn post(&self, path_and_query: &str, content_type: &str, body: &[u8]) -> Delivery {
        let url = format!("{}{path_and_query}", self.base);
        let mut request = self.agent.post(&url).header("Content-Type", content_type);
        if let Some(auth) = &self.options.auth {
            request = request.header("Authorization", auth.header());
        }
        if let Some(tenant) = &self.options.tenant {
            request = request.header("X-Scope-OrgID", tenant);
        }
        match request.send(body) {
            Ok(mut response) => {
                let status = response.status().as_u16();
                let after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let message = response
                    .body_mut()
                    .with_config()
                    .limit(4096)
                    .read_to_string()
                    .unwrap_or_default()
                    .chars()
                    .take(200)
                    .collect::<String>()
                    .replace(['\n', '\r'], " ");
                match status {
                    200..=299 => Delivery::Sent,
                    429 | 500..=599 => Delivery::Retry { reason: format!("HTTP {status}: {message}"), after },
                    _ => Delivery::Rejected { status, message },
                }
            }
            Err(e) => Delivery::Retry { reason: describe(&e), after: None },
        }
    }
}

/// A transport error in words, with its cause (TLS failures name the certificate problem).
fn describe(e: &ureq::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}
