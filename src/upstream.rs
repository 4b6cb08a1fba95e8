//! The HTTP client that carries calls to bedrock-mantle: hyper's pooled client, over rustls.
//!
//! reqwest (still used for webhooks and the Projects API) costs a proxy more than it gives
//! it: per call it parsed the URL three times (building the request, its redirect policy, the
//! response), ran a retry and a redirect layer the proxy does not use (mantlegate retries
//! itself and never follows redirects), and boxed the bodies twice. Together that was about
//! 8 % of a non-streamed call's CPU. Here a request is a `http::Request` built from the
//! scheme and authority parsed once at load, and the answer's body is hyper's own.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// The pooled upstream client (HTTP/1.1, or HTTP/2 when TLS negotiates it).
pub type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the client: TLS verified against the platform's roots, as reqwest did; no Nagle
/// delay; idle connections kept a minute.
///
/// # Errors
/// When the TLS setup fails (no usable root store).
pub fn client(connect_timeout: Duration) -> anyhow::Result<UpstreamClient> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    // https is handled by the TLS wrapper, which hands plain connects to this one.
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_platform_verifier(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))?
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_mins(1))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https))
}

/// Where calls go: the scheme and host of `upstream.base_url`, parsed once, and its path.
#[derive(Debug, Clone)]
pub struct Origin {
    scheme: axum::http::uri::Scheme,
    authority: axum::http::uri::Authority,
    /// The base URL's path prefix (`""` for none), without a trailing `/`.
    pub base_path: String,
}

impl Origin {
    /// Parses `base_url` (scheme, host, optional port and path prefix).
    ///
    /// # Errors
    /// When it is not an http(s) URL with a host.
    pub fn parse(base_url: &str) -> anyhow::Result<Self> {
        // The URL crate normalizes (lowercase host, IDNA, default port) once, here.
        let url = reqwest::Url::parse(base_url.trim_end_matches('/'))?;
        let scheme = match url.scheme() {
            "http" => axum::http::uri::Scheme::HTTP,
            "https" => axum::http::uri::Scheme::HTTPS,
            other => anyhow::bail!("upstream scheme `{other}` is not http or https"),
        };
        let host = url
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("the upstream URL has no host"))?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        Ok(Self {
            scheme,
            authority: authority.parse()?,
            base_path: url.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The URI of a call to `path` (already including the base path) with `query`.
    ///
    /// # Errors
    /// When the path or query holds bytes a URI may not.
    pub fn uri(
        &self,
        path: &str,
        query: Option<&str>,
    ) -> Result<axum::http::Uri, axum::http::Error> {
        let mut pq = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        axum::http::Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_uri_is_the_origin_with_the_path_and_query() {
        let o = Origin::parse("https://Bedrock-Mantle.us-east-1.api.aws/").expect("parse");
        assert_eq!(o.base_path, "");
        let uri = o
            .uri("/openai/v1/responses/resp_1", Some("include=x"))
            .expect("uri");
        assert_eq!(
            uri.to_string(),
            "https://bedrock-mantle.us-east-1.api.aws/openai/v1/responses/resp_1?include=x"
        );
        let o = Origin::parse("http://127.0.0.1:9000/prefix/").expect("parse");
        assert_eq!(o.base_path, "/prefix");
        assert_eq!(
            o.uri("/prefix/v1/chat/completions", None)
                .expect("uri")
                .to_string(),
            "http://127.0.0.1:9000/prefix/v1/chat/completions"
        );
    }

    #[test]
    fn only_http_and_https_upstreams_are_accepted() {
        assert!(Origin::parse("ftp://example.com").is_err());
        assert!(Origin::parse("not a url").is_err());
    }

    #[test]
    fn the_client_builds_with_the_platform_roots() {
        client(Duration::from_secs(1)).expect("client");
    }
}
