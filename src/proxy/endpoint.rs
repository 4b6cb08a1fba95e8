//! Which forwarded endpoint a path names, after its route prefix and `/v1` (pure).

use std::borrow::Cow;

use axum::http::Method;

use crate::error::ProxyError;

/// The OpenAI API family of an endpoint, for logs, metrics and the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/chat/completions`
    ChatCompletions,
    /// `/v1/responses` and its sub-resources
    Responses,
    /// `/v1/models`
    Models,
}

impl Api {
    /// Stable lowercase name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat.completions",
            Self::Responses => "responses",
            Self::Models => "models",
        }
    }
}

/// Every endpoint mantlegate forwards; anything else under `/v1` is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/responses`
    CreateResponse,
    /// `POST /v1/responses/input_tokens`
    CountInputTokens,
    /// `GET /v1/responses/{id}`
    GetResponse,
    /// `DELETE /v1/responses/{id}`
    DeleteResponse,
    /// `POST /v1/responses/{id}/cancel`
    CancelResponse,
    /// `GET /v1/responses/{id}/input_items`
    ListInputItems,
    /// `GET /v1/models`
    ListModels,
    /// `GET /v1/models/{id}`
    GetModel,
}

impl Endpoint {
    /// Classifies `rest`, the path after `/v1` (empty or starting with `/`).
    ///
    /// # Errors
    /// 404 `unknown_endpoint` for anything not forwarded.
    pub fn classify(method: &Method, rest: &str, full_path: &str) -> Result<Self, ProxyError> {
        let mut segments = rest.strip_prefix('/').unwrap_or(rest).split('/');
        let parts = (
            segments.next().unwrap_or(""),
            segments.next(),
            segments.next(),
            segments.next(),
        );
        let found = match (method.as_str(), parts) {
            ("POST", ("chat", Some("completions"), None, None)) => Some(Self::ChatCompletions),
            ("POST", ("responses", None, None, None)) => Some(Self::CreateResponse),
            ("POST", ("responses", Some("input_tokens"), None, None)) => {
                Some(Self::CountInputTokens)
            }
            ("GET", ("responses", Some(id), None, None)) if !id.is_empty() => {
                Some(Self::GetResponse)
            }
            ("DELETE", ("responses", Some(id), None, None)) if !id.is_empty() => {
                Some(Self::DeleteResponse)
            }
            ("POST", ("responses", Some(id), Some("cancel"), None)) if !id.is_empty() => {
                Some(Self::CancelResponse)
            }
            ("GET", ("responses", Some(id), Some("input_items"), None)) if !id.is_empty() => {
                Some(Self::ListInputItems)
            }
            ("GET", ("models", None, None, None)) => Some(Self::ListModels),
            ("GET", ("models", Some(id), None, None)) if !id.is_empty() => Some(Self::GetModel),
            _ => None,
        };
        found.ok_or_else(|| unknown(method, full_path))
    }

    /// The response id in `rest` for endpoints that address a stored response.
    #[must_use]
    pub fn response_id(self, rest: &str) -> Option<&str> {
        match self {
            Self::GetResponse
            | Self::DeleteResponse
            | Self::CancelResponse
            | Self::ListInputItems => rest.strip_prefix("/responses/")?.split('/').next(),
            _ => None,
        }
    }

    /// The API family.
    #[must_use]
    pub fn api(self) -> Api {
        match self {
            Self::ChatCompletions => Api::ChatCompletions,
            Self::ListModels | Self::GetModel => Api::Models,
            _ => Api::Responses,
        }
    }

    /// Whether the call carries a JSON body that must be valid (and may name a model).
    #[must_use]
    pub fn has_json_body(self) -> bool {
        matches!(
            self,
            Self::ChatCompletions | Self::CreateResponse | Self::CountInputTokens
        )
    }

    /// Whether a body is forwarded at all.
    #[must_use]
    pub fn forwards_body(self) -> bool {
        self.has_json_body() || self == Self::CancelResponse
    }
}

/// The part of a call's path after its API root, the route's prefix already taken off: the root
/// is `/v1`, or `/openai/v1`, where the OpenAI SDKs' `BedrockOpenAI` clients point by default
/// (bedrock-mantle's root for some models). Both lead to the same endpoints, and the upstream
/// prefix is chosen by the body's model either way, so an app may keep whichever root it used
/// with bedrock-mantle, whatever model it calls. `None`: neither root.
#[must_use]
pub fn api_rest(path: &str) -> Option<&str> {
    let path = path.strip_prefix("/openai").unwrap_or(path);
    path.strip_prefix("/v1")
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// 404 `unknown_endpoint` for `method path`.
#[must_use]
pub fn unknown(method: &Method, path: &str) -> ProxyError {
    ProxyError::UnknownEndpoint {
        method: method.to_string(),
        path: printable(path),
    }
}

/// Why a path is refused by [`canonicalize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathFault {
    /// It does not start with `/`.
    NotAbsolute,
    /// `//`: an empty segment, which servers collapse differently.
    EmptySegment,
    /// A `.` or `..` segment (escaped or not).
    DotSegment,
    /// A backslash (escaped or not): some servers read it as `/`.
    Backslash,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// `%25`: an escaped `%`, a second layer of escaping that a second decoder would undo.
    DoubleEscape,
    /// `%2F`: an escaped `/`, which hides a segment boundary.
    EscapedSlash,
    /// A control character (`%00`, `%0A`, DEL, C1...).
    ControlChar,
    /// The decoded bytes are not UTF-8 in its one canonical form (overlong `%C0%AF`,
    /// surrogates, truncated sequences, stray continuation bytes).
    InvalidUtf8,
}

/// Whether a byte stands for itself in a canonical path: RFC 3986's `pchar` without
/// `pct-encoded` (unreserved, sub-delims, `:` and `@`). Every other byte is escaped.
fn is_plain(b: u8) -> bool {
    PLAIN[usize::from(b)]
}

/// [`is_plain`] as a table: every byte of every request path is looked up here.
static PLAIN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        #[expect(clippy::cast_possible_truncation, reason = "b < 256")]
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'@'
            );
        b += 1;
    }
    table
};

/// The one canonical form of a request path, or why it has none (pure; never panics).
///
/// Every escape is decoded exactly once: an escape of `%` (a second layer), of `/` or `\`, of a
/// control character, a malformed escape, or decoded bytes that are not canonical UTF-8 are
/// refused, as are `//`, `.`/`..` segments (escaped or not) and backslashes. In the result
/// the bytes of [`is_plain`] and `/` stand for themselves and every other byte is written
/// `%XX` (upper-case hex), so two paths that any server decodes alike have one canonical
/// form, and `canonicalize(canonicalize(p)) == canonicalize(p)`. A path already canonical
/// (the usual case: no escape at all) is borrowed, not copied.
///
/// # Errors
/// The first [`PathFault`] found.
pub fn canonicalize(path: &[u8]) -> Result<Cow<'_, str>, PathFault> {
    if path.first() != Some(&b'/') {
        return Err(PathFault::NotAbsolute);
    }
    if let Some(checked) = plain_path(path) {
        checked?;
        // All ASCII, so this cannot fail; no unwrap on request input all the same.
        return std::str::from_utf8(path)
            .map(Cow::Borrowed)
            .map_err(|_| PathFault::InvalidUtf8);
    }
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b == b'%' {
            let hex = |at: usize| path.get(at).and_then(|&h| char::from(h).to_digit(16));
            let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                return Err(PathFault::BadEscape);
            };
            // Both digits are below 16: the byte fits.
            let v = u8::try_from(hi * 16 + lo).map_err(|_| PathFault::BadEscape)?;
            match v {
                b'%' => return Err(PathFault::DoubleEscape),
                b'/' => return Err(PathFault::EscapedSlash),
                b'\\' => return Err(PathFault::Backslash),
                _ => decoded.push(v),
            }
            i += 3;
        } else {
            if b == b'\\' {
                return Err(PathFault::Backslash);
            }
            decoded.push(b);
            i += 1;
        }
    }
    let text = std::str::from_utf8(&decoded).map_err(|_| PathFault::InvalidUtf8)?;
    if text.chars().any(char::is_control) {
        return Err(PathFault::ControlChar);
    }
    check_segments(&decoded)?;
    let mut out = String::with_capacity(decoded.len() + decoded.len() / 2);
    for &b in &decoded {
        if b == b'/' || is_plain(b) {
            out.push(char::from(b));
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    Ok(Cow::Owned(out))
}

/// `//` and dot segments in a decoded path (which starts with `/`).
/// The check of [`check_segments`] and of [`is_plain`] in one pass, for the usual path that
/// needs no decoding (every forwarded call's path goes through here); `None` when a byte is
/// neither plain nor `/`, and the path must be decoded first.
fn plain_path(path: &[u8]) -> Option<Result<(), PathFault>> {
    let mut start = 1;
    let mut fault = None;
    for (i, &b) in path.iter().enumerate().skip(1) {
        if b == b'/' {
            if fault.is_none() {
                fault = segment_fault(&path[start..i], false);
            }
            start = i + 1;
        } else if !is_plain(b) {
            return None;
        }
    }
    if fault.is_none() {
        fault = segment_fault(path.get(start..).unwrap_or_default(), true);
    }
    Some(fault.map_or(Ok(()), Err))
}

/// What is wrong with one segment of a path (`last`: the one after its final `/`).
fn segment_fault(segment: &[u8], last: bool) -> Option<PathFault> {
    match segment {
        b"." | b".." => Some(PathFault::DotSegment),
        // A trailing `/` leaves an empty last segment: no endpoint, but not ambiguous.
        b"" if !last => Some(PathFault::EmptySegment),
        _ => None,
    }
}

fn check_segments(path: &[u8]) -> Result<(), PathFault> {
    let segments = path.get(1..).unwrap_or_default().split(|&b| b == b'/');
    let last = segments.clone().count().saturating_sub(1);
    for (i, segment) in segments.enumerate() {
        if let Some(fault) = segment_fault(segment, i == last) {
            return Err(fault);
        }
    }
    Ok(())
}

/// The canonical form of a call's path ([`canonicalize`]).
///
/// # Errors
/// 400 `invalid_path`.
pub fn canonical_path(path: &str) -> Result<Cow<'_, str>, ProxyError> {
    canonicalize(path.as_bytes()).map_err(|_| ProxyError::InvalidPath(printable(path)))
}

/// Longest response id accepted (bedrock-mantle's are about 50 characters).
pub const MAX_RESPONSE_ID: usize = 256;

/// Whether `id` is a response id mantlegate accepts: 1 to [`MAX_RESPONSE_ID`] letters,
/// digits, `_` and `-`. Anything else could be read differently by the upstream than by the
/// ownership and billing indexes, which are keyed by this exact text.
#[must_use]
pub fn is_response_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_RESPONSE_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `id` when [`is_response_id`] accepts it.
///
/// # Errors
/// 400 `invalid_path`.
pub fn response_id(id: &str) -> Result<&str, ProxyError> {
    if is_response_id(id) {
        Ok(id)
    } else {
        Err(ProxyError::InvalidResponseId(printable(id)))
    }
}

/// Whether `path` is under `/admin`, mantlegate's own API: a path there that is not one of its
/// endpoints is no call to forward (and none to bill).
#[must_use]
pub fn is_admin(path: &str) -> bool {
    path.strip_prefix("/admin")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// A path cut to a length and character set safe to echo in an error message.
fn printable(path: &str) -> String {
    path.chars()
        .take(200)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(method: &Method, rest: &str) -> Result<Endpoint, &'static str> {
        Endpoint::classify(method, rest, rest).map_err(|e| e.code())
    }

    #[test]
    fn forwarded_endpoints() {
        let (get, post, delete) = (Method::GET, Method::POST, Method::DELETE);
        assert_eq!(
            class(&post, "/chat/completions"),
            Ok(Endpoint::ChatCompletions)
        );
        assert_eq!(class(&post, "/responses"), Ok(Endpoint::CreateResponse));
        assert_eq!(
            class(&post, "/responses/input_tokens"),
            Ok(Endpoint::CountInputTokens)
        );
        assert_eq!(class(&get, "/responses/resp_1"), Ok(Endpoint::GetResponse));
        assert_eq!(
            class(&delete, "/responses/resp_1"),
            Ok(Endpoint::DeleteResponse)
        );
        assert_eq!(
            class(&post, "/responses/resp_1/cancel"),
            Ok(Endpoint::CancelResponse)
        );
        assert_eq!(
            class(&get, "/responses/resp_1/input_items"),
            Ok(Endpoint::ListInputItems)
        );
        assert_eq!(class(&get, "/models"), Ok(Endpoint::ListModels));
        assert_eq!(
            class(&get, "/models/openai.gpt-oss-120b"),
            Ok(Endpoint::GetModel)
        );
    }

    #[test]
    fn everything_else_is_unknown() {
        let (get, post) = (Method::GET, Method::POST);
        for (m, rest) in [
            (&get, "/organization/projects"),
            (&post, "/organization/projects/proj_1"),
            (&get, "/chat/completions"),
            (&post, "/chat/completions/"),
            (&post, "/embeddings"),
            (&get, ""),
            (&get, "/data_retention"),
            (&Method::PUT, "/responses/resp_1"),
            (&get, "/responses/"),
            (&get, "/responses/resp_1/input_items/x"),
        ] {
            assert_eq!(class(m, rest), Err("unknown_endpoint"), "{m} {rest}");
        }
    }

    #[test]
    fn both_api_roots_lead_to_the_same_rest() {
        for (path, rest) in [
            ("/v1/chat/completions", Some("/chat/completions")),
            ("/openai/v1/chat/completions", Some("/chat/completions")),
            ("/openai/v1/responses/resp_1", Some("/responses/resp_1")),
            ("/v1", Some("")),
            ("/openai/v1", Some("")),
            ("/v1x/models", None),
            ("/openai/v1x/models", None),
            ("/openaiv1/models", None),
            ("/openai/models", None),
            ("/openai", None),
            ("/openai/openai/v1/models", None),
            ("/anthropic/v1/messages", None),
            ("/v2/models", None),
            ("", None),
        ] {
            assert_eq!(api_rest(path), rest, "{path}");
        }
    }

    #[test]
    fn abnormal_paths_are_refused() {
        for p in [
            "/chatbot/../v1/organization/projects",
            "/v1//chat/completions",
            "/v1/./chat/completions",
            "/v1/%2e%2e/organization",
            "/v1/responses%2Fx",
            "/v1\\chat",
        ] {
            assert!(canonical_path(p).is_err(), "{p}");
        }
        assert!(canonical_path("/chatbot/v1/chat/completions").is_ok());
    }

    fn canon(p: &str) -> Result<String, PathFault> {
        canonicalize(p.as_bytes()).map(Cow::into_owned)
    }

    #[test]
    fn canonical_paths_decode_each_escape_once() {
        for (path, canonical) in [
            ("/v1/responses/resp_1", "/v1/responses/resp_1"),
            ("/v1/responses/%72esp_1", "/v1/responses/resp_1"),
            ("/v1/responses/%72%65%73%70%5F1", "/v1/responses/resp_1"),
            ("/%76%31/models", "/v1/models"),
            ("/v1/models/a%2eb", "/v1/models/a.b"),
            ("/v1/models/a%3ab", "/v1/models/a:b"),
            (
                "/v1/models/us.anthropic.claude:0",
                "/v1/models/us.anthropic.claude:0",
            ),
            ("/v1/x%20y", "/v1/x%20y"),
            ("/v1/x%3fy%23z", "/v1/x%3Fy%23z"),
            ("/v1/%e2%82%ac", "/v1/%E2%82%AC"),
            ("/v1/%7e", "/v1/~"),
            ("/v1/a{b", "/v1/a%7Bb"),
            ("/v1/responses/", "/v1/responses/"),
            ("/", "/"),
        ] {
            assert_eq!(canon(path).as_deref(), Ok(canonical), "{path}");
        }
        // Nothing to decode: the path itself, not a copy.
        let plain = "/v1/chat/completions";
        assert!(matches!(canonicalize(plain.as_bytes()), Ok(Cow::Borrowed(p)) if p == plain));
    }

    #[test]
    fn every_fault_is_named() {
        use PathFault::*;
        for (path, fault) in [
            ("", NotAbsolute),
            ("v1/models", NotAbsolute),
            ("%2Fv1/models", NotAbsolute),
            ("//v1/models", EmptySegment),
            ("/v1//models", EmptySegment),
            ("/v1/%2e%2e/x", DotSegment),
            ("/v1/.%2E/x", DotSegment),
            ("/v1/%2e/x", DotSegment),
            ("/v1/..", DotSegment),
            ("/v1/.", DotSegment),
            ("/v1\\x", Backslash),
            ("/v1%5cx", Backslash),
            ("/v1%5Cx", Backslash),
            ("/v1/%", BadEscape),
            ("/v1/%2", BadEscape),
            ("/v1/%zz", BadEscape),
            ("/v1/%+1", BadEscape),
            ("/v1/%%31", BadEscape),
            ("/v1/%252e%252e/x", DoubleEscape),
            ("/v1/responses/%2572esp_1", DoubleEscape),
            ("/v1/%25", DoubleEscape),
            ("/v1/responses%2Fx", EscapedSlash),
            ("/v1/responses%2fx", EscapedSlash),
            ("/v1/responses/%00", ControlChar),
            ("/v1/responses/%0a", ControlChar),
            ("/v1/responses/%7F", ControlChar),
            ("/v1/responses/%C2%85", ControlChar),
            ("/v1/%C0%AF", InvalidUtf8),
            ("/v1/%C0%AE%C0%AE/x", InvalidUtf8),
            ("/v1/%E0%80%AF", InvalidUtf8),
            ("/v1/%F0%80%80%AF", InvalidUtf8),
            ("/v1/%ED%A0%80", InvalidUtf8),
            ("/v1/%E2%82", InvalidUtf8),
            ("/v1/%80", InvalidUtf8),
            ("/v1/%FF", InvalidUtf8),
        ] {
            assert_eq!(canon(path), Err(fault), "{path}");
        }
        assert_eq!(
            canonicalize(b"/v1/\xC0\xAF"),
            Err(PathFault::InvalidUtf8),
            "raw bytes are held to the same rules"
        );
    }

    #[test]
    fn response_ids_are_letters_digits_underscore_and_dash() {
        for ok in ["resp_1", "resp-AZaz09", "r", &"x".repeat(MAX_RESPONSE_ID)] {
            assert!(is_response_id(ok), "{ok}");
        }
        for bad in [
            "",
            "resp.1",
            "..",
            "resp 1",
            "resp%2F1",
            "resp/1",
            "r\u{e9}sp",
            "resp\u{0}",
            &"x".repeat(MAX_RESPONSE_ID + 1),
        ] {
            assert!(!is_response_id(bad), "{bad}");
            assert_eq!(
                response_id(bad).map_err(|e| e.code()),
                Err("invalid_path"),
                "{bad}"
            );
        }
    }

    #[test]
    fn admin_paths() {
        for p in ["/admin", "/admin/", "/admin/v1/x", "/admin/v2"] {
            assert!(is_admin(p), "{p}");
        }
        for p in ["/administrator", "/v1/admin", "/", "/adminv1/costs"] {
            assert!(!is_admin(p), "{p}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Any bytes: no panic, and a canonical form is its own canonical form, free of the
        /// refused shapes.
        #[test]
        fn canonical_form_is_stable(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            if let Ok(once) = canonicalize(&raw) {
                let twice = canonicalize(once.as_bytes());
                proptest::prop_assert_eq!(twice.as_deref(), Ok(&*once));
                proptest::prop_assert!(!once.contains("//") && !once.contains('\\'));
                proptest::prop_assert!(!once.to_ascii_lowercase().contains("%25"));
            }
        }

        /// Paths made of the pieces attacks are made of: the same.
        #[test]
        fn tricky_paths_are_stable(parts in proptest::collection::vec(proptest::sample::select(vec![
            "/", ".", "..", "%2e", "%2E", "%2f", "%25", "%5c", "\\", "%", "%C0", "%AF", "%E2%82%AC",
            "%00", "%7F", "resp_1", "v1", "a", "%72", "%3F", "?", "{", " ", "\u{e9}",
        ]), 0..12)) {
            let path: String = parts.concat();
            if let Ok(once) = canonicalize(path.as_bytes()) {
                let twice = canonicalize(once.as_bytes());
                proptest::prop_assert_eq!(twice.as_deref(), Ok(&*once));
            }
        }

        /// The one-pass check of an undecoded path says what the two separate checks say.
        #[test]
        fn the_one_pass_check_agrees_with_the_two_steps(raw in "/[a-z./%]{0,24}") {
            let bytes = raw.as_bytes();
            let two_steps = bytes
                .iter()
                .all(|&b| b == b'/' || is_plain(b))
                .then(|| check_segments(bytes));
            proptest::prop_assert_eq!(plain_path(bytes), two_steps);
        }

        /// Escaping plain bytes changes nothing: the canonical form is that of the plain path.
        #[test]
        fn escaping_is_undone(id in "[A-Za-z0-9_-]{1,20}", mask in proptest::prelude::any::<u32>()) {
            let escaped: String = id
                .bytes()
                .enumerate()
                .map(|(i, b)| if mask >> (i % 32) & 1 == 1 { format!("%{b:02x}") } else { char::from(b).to_string() })
                .collect();
            let path = format!("/v1/responses/{escaped}");
            let canonical = format!("/v1/responses/{id}");
            let got = canonicalize(path.as_bytes());
            proptest::prop_assert_eq!(got.as_deref(), Ok(canonical.as_str()));
        }
    }
}
