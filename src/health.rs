//! `mantlegate health`: one bounded HTTP/1.1 GET of a running proxy's `/readyz` or `/healthz`,
//! for container health checks in an image that has no curl.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
use std::time::{Duration, Instant};

use axum::http::Uri;

/// The image's listener (`--listen 0.0.0.0:8080`) and its readiness endpoint.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080/readyz";

/// A response head longer than this is not a health endpoint's.
const MAX_HEAD: usize = 16 * 1024;
/// Bytes of the body kept for the message (`/readyz` says there why it is not ready).
const MAX_BODY: usize = 1024;

/// Why the endpoint is not healthy.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Url(String),
    #[error("cannot reach {url}: {source}")]
    Connect { url: String, source: io::Error },
    #[error("{url} gave no whole answer within {}", humantime_serde::re::humantime::format_duration(*.timeout))]
    Timeout { url: String, timeout: Duration },
    #[error("{url} did not answer with HTTP: {why}")]
    Malformed { url: String, why: &'static str },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
}

/// A 2xx answer: its status and (the start of) its body.
#[derive(Debug, PartialEq, Eq)]
pub struct Healthy {
    pub status: u16,
    pub body: String,
}

/// Where to connect and what to send for `url` (`http://HOST[:PORT][/PATH]`).
#[derive(Debug, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    /// `Host` header value.
    authority: String,
    path: String,
}

fn target(url: &str) -> Result<Target, ProbeError> {
    let bad = |why: &str| ProbeError::Url(format!("--url {url:?}: {why}"));
    let uri: Uri = url
        .parse()
        .map_err(|_| bad("not a URL; give one like http://127.0.0.1:8080/readyz"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "only plain http is probed; give the address mantlegate listens on",
            ));
        }
        _ => return Err(bad("give one like http://127.0.0.1:8080/readyz")),
    }
    let authority = uri
        .authority()
        .ok_or_else(|| bad("it names no host"))?
        .as_str();
    if authority.contains('@') {
        // Not echoed: the URL holds a password.
        return Err(ProbeError::Url(
            "--url: credentials in the URL are not sent; leave them out".to_owned(),
        ));
    }
    let host = uri.host().ok_or_else(|| bad("it names no host"))?;
    Ok(Target {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port: uri.port_u16().unwrap_or(80),
        authority: authority.to_owned(),
        path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
    })
}

/// GETs `url` and waits at most `timeout` in all (name lookup aside) for the response head.
/// `Ok` for a 2xx answer; any other status, or no HTTP answer in time, is an error.
pub fn probe(url: &str, timeout: Duration) -> Result<Healthy, ProbeError> {
    let deadline = Instant::now() + timeout;
    let target = target(url)?;
    let timed_out = || ProbeError::Timeout {
        url: url.to_owned(),
        timeout,
    };
    let connect_error = |source| ProbeError::Connect {
        url: url.to_owned(),
        source,
    };
    let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(connect_error)?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
    let mut stream = None;
    for addr in addrs {
        let left = remaining(deadline).ok_or_else(timed_out)?;
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(timed_out()),
            Err(e) => last = e,
        }
    }
    let mut stream = stream.ok_or_else(|| connect_error(last))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: {}\r\nuser-agent: mantlegate-health\r\nconnection: close\r\n\r\n",
        target.path, target.authority
    );
    stream
        .set_write_timeout(Some(remaining(deadline).ok_or_else(timed_out)?))
        .and_then(|()| stream.write_all(request.as_bytes()))
        .map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(),
            _ => connect_error(e),
        })?;

    let malformed = |why| ProbeError::Malformed {
        url: url.to_owned(),
        why,
    };
    let mut buf = Vec::with_capacity(4096);
    let (status, head_len, content_length) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let status = response.code.unwrap_or(0);
                let length = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    });
                break (status, n, length);
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Err(malformed("too many headers")),
            Err(_) => return Err(malformed("not an HTTP/1.x response head")),
        }
        if buf.len() >= MAX_HEAD {
            return Err(malformed("a response head longer than 16 KiB"));
        }
        match read_some(&mut stream, &mut buf, MAX_HEAD, deadline) {
            Ok(0) => return Err(malformed("the connection closed before a whole head")),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return Err(timed_out()),
            Err(e) => return Err(connect_error(e)),
        }
    };
    // The body is only shown: read what arrives of it in time, up to its length or MAX_BODY.
    let want = content_length.unwrap_or(MAX_BODY).min(MAX_BODY);
    while buf.len() - head_len < want {
        match read_some(&mut stream, &mut buf, head_len + want, deadline) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let end = buf.len().min(head_len + want);
    let body = printable(&buf[head_len..end]);
    if (200..300).contains(&status) {
        Ok(Healthy { status, body })
    } else {
        Err(ProbeError::Status {
            url: url.to_owned(),
            status,
            body,
        })
    }
}

fn remaining(deadline: Instant) -> Option<Duration> {
    Some(deadline.checked_duration_since(Instant::now())?).filter(|d| !d.is_zero())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads more into `buf`, up to `limit` bytes in all, waiting no later than `deadline`.
fn read_some(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    limit: usize,
    deadline: Instant,
) -> io::Result<usize> {
    let left = remaining(deadline).ok_or(io::ErrorKind::TimedOut)?;
    stream.set_read_timeout(Some(left))?;
    let mut chunk = [0u8; 4096];
    let max = limit.saturating_sub(buf.len()).min(chunk.len());
    let n = stream.read(&mut chunk[..max])?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// `bytes` as one line of text for a terminal: invalid UTF-8 and control characters become
/// replacement characters and spaces, so a peer cannot write escape sequences to it.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_gives_host_port_authority_and_path() {
        assert_eq!(
            target("http://127.0.0.1:8081/readyz").expect("url"),
            Target {
                host: "127.0.0.1".into(),
                port: 8081,
                authority: "127.0.0.1:8081".into(),
                path: "/readyz".into(),
            }
        );
        let t = target("http://[::1]/healthz?x=1").expect("url");
        assert_eq!((t.host.as_str(), t.port), ("::1", 80));
        assert_eq!(t.authority, "[::1]");
        assert_eq!(t.path, "/healthz?x=1");
        assert_eq!(target("http://localhost").expect("url").path, "/");
    }

    #[test]
    fn urls_it_cannot_probe_are_refused_with_what_to_give() {
        for (url, says) in [
            ("https://127.0.0.1:8080/readyz", "only plain http"),
            ("127.0.0.1:8080", "like http://"),
            ("/readyz", "like http://"),
            ("http://user:pw@127.0.0.1/readyz", "credentials"),
            ("http://exa mple/", "not a URL"),
            ("", "not a URL"),
        ] {
            let err = target(url).expect_err(url).to_string();
            assert!(err.contains(says), "{url}: {err}");
            assert!(!err.contains("pw"), "{err}");
        }
    }

    #[test]
    fn a_body_is_shown_as_one_harmless_line() {
        assert_eq!(
            printable(b"{\"status\":\"ready\"}\r\n"),
            r#"{"status":"ready"}"#
        );
        assert_eq!(printable(b"a\x1b[2Jb\nc\xff"), "a [2Jb c\u{fffd}");
    }
}
