//! Header hygiene: what crosses the proxy in each direction (pure).

use axum::http::{HeaderMap, HeaderName, header};

/// Hop-by-hop headers (RFC 9110 §7.6.1) and their legacy kin: never relayed either way.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Request headers that mantlegate sets itself or that must not reach bedrock-mantle.
fn dropped_upstream(name: &HeaderName) -> bool {
    let n = name.as_str();
    // The client's credential and claimed identity are replaced; cookies and forwarding
    // headers describe the client's hop, not ours. `host` and `content-length` are set by
    // the HTTP client for the upstream request. `accept-encoding` is dropped so answers come
    // uncompressed: the proxy reads usage from them.
    matches!(
        n,
        "authorization"
            | "x-api-key"
            | "openai-organization"
            | "openai-project"
            | "cookie"
            | "host"
            | "content-length"
            | "accept-encoding"
            | "forwarded"
            | "via"
            | "upgrade"
            | "expect"
    ) || n.starts_with("x-forwarded-")
        || HOP_BY_HOP.contains(name)
}

/// Headers named by the client's `Connection` header are hop-by-hop too.
fn connection_listed(headers: &HeaderMap, name: &HeaderName) -> bool {
    crate::upstream::connection_lists(headers, name.as_str())
}

/// Copies the client's headers that may reach the upstream into `out`.
pub fn copy_upstream(client: &HeaderMap, out: &mut HeaderMap) {
    let has_connection = client.contains_key(header::CONNECTION);
    for (name, value) in client {
        if dropped_upstream(name) || (has_connection && connection_listed(client, name)) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
}

/// Removes hop-by-hop headers from an upstream response before it is relayed. A
/// `content-length` beside a `transfer-encoding` goes too: the body was framed by the coding,
/// and mantlegate frames its own answer (RFC 9112 §6.3).
pub fn strip_response(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&listed) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_hop_headers_stay_behind() {
        let mut client = HeaderMap::new();
        for (n, v) in [
            ("authorization", "Bearer mg-secret"),
            ("x-api-key", "mg-secret"),
            ("openai-organization", "org_1"),
            ("openai-project", "proj_x"),
            ("cookie", "a=b"),
            ("x-forwarded-for", "10.0.0.1"),
            ("connection", "keep-alive, x-custom-hop"),
            ("x-custom-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("host", "proxy"),
            ("user-agent", "OpenAI/Python 1.0"),
            ("x-stainless-lang", "python"),
            ("content-type", "application/json"),
            ("accept", "application/json"),
        ] {
            client.append(n, v.parse().expect("value"));
        }
        let mut out = HeaderMap::new();
        copy_upstream(&client, &mut out);
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["accept", "content-type", "user-agent", "x-stainless-lang"]
        );
    }

    #[test]
    fn response_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-hop".parse().expect("value"));
        h.insert("x-hop", "1".parse().expect("value"));
        h.insert("transfer-encoding", "chunked".parse().expect("value"));
        h.insert("content-length", "5".parse().expect("value"));
        h.insert("x-request-id", "req_1".parse().expect("value"));
        strip_response(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-request-id"));
    }
}
