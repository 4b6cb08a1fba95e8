//! Who is calling and which project pays: credential, route and `OpenAI-Project` -> project.

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::error::ProxyError;
use crate::state::{Key, ProjectIdx, Route, Snapshot};

/// The caller's key as sent: `Authorization: Bearer KEY` or `x-api-key: KEY`.
///
/// # Errors
/// 401 `invalid_api_key` when neither header carries a key.
pub fn credential(headers: &HeaderMap) -> Result<&str, ProxyError> {
    let from_authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    let key = from_authorization
        .or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        })
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ProxyError::InvalidApiKey(missing_key(headers).into()))?;
    Ok(key)
}

/// Why a call carried no key, in words that say what to send instead.
fn missing_key(headers: &HeaderMap) -> &'static str {
    // The SDKs' Bedrock clients sign with AWS credentials when given them instead of a key.
    let signed = headers
        .get(axum::http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes().starts_with(b"AWS4-"));
    if signed {
        "this call is signed with AWS credentials (SigV4), which mantlegate does not take from callers: send your mantlegate key as `Authorization: Bearer KEY` (the api_key of the OpenAI SDKs and of their Bedrock clients)"
    } else {
        "no API key: send your mantlegate key as `Authorization: Bearer KEY` (the OpenAI SDKs' api_key) or `x-api-key: KEY`"
    }
}

/// The key for a credential, found by its SHA-256 (the key itself is never compared).
///
/// # Errors
/// 401 `invalid_api_key` when no configured key has that hash, or it is disabled or expired
/// (the message says which, and nothing about other keys).
pub fn authenticate<'s>(snap: &'s Snapshot, credential: &str) -> Result<&'s Key, ProxyError> {
    let hash: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
    let key = snap.key(&hash).ok_or(ProxyError::InvalidApiKey(
        "the API key is not known to mantlegate: check the key, or ask your platform team for one"
            .into(),
    ))?;
    if key.disabled {
        return Err(ProxyError::InvalidApiKey(
            "this API key is disabled: ask your platform team for a new one".into(),
        ));
    }
    if let Some(expires) = key.expires_at
        && jiff::Timestamp::now() >= expires
    {
        return Err(ProxyError::InvalidApiKey(
            format!("this API key expired at {expires}: ask your platform team for a new one")
                .into(),
        ));
    }
    Ok(key)
}

/// Decides the project of a call (rules in README "Attribution"):
/// 1. a client-sent project must be one the call may use (the route's, else one of the key's);
/// 2. without one: the route's project, else the key's first project;
/// 3. still none: the configured fallback, or 400 `project_required`.
///
/// # Errors
/// 403 `project_forbidden` or 400 `project_required`.
pub fn resolve(
    snap: &Snapshot,
    key: &Key,
    route: Option<&Route>,
    requested: Option<&str>,
) -> Result<ProjectIdx, ProxyError> {
    let key_may_use = |p: ProjectIdx| key.projects.is_empty() || key.projects.contains(&p);
    if let Some(handle) = requested {
        let allowed = match snap.project_by_handle(handle) {
            Some(p) => match route {
                Some(r) => p == r.project && key_may_use(p),
                None => key.projects.contains(&p),
            },
            None => false,
        };
        return if allowed {
            snap.project_by_handle(handle).ok_or(ProxyError::Internal)
        } else {
            Err(forbidden(snap, key, route, handle))
        };
    }
    if let Some(r) = route {
        return if key_may_use(r.project) {
            Ok(r.project)
        } else {
            Err(ProxyError::ProjectForbidden(format!(
                "key `{}` may not use project `{}` of route `{}`; it may use: {}",
                key.name,
                snap.projects[r.project].name,
                r.prefix,
                allowed_list(snap, key),
            )))
        };
    }
    if let Some(&first) = key.projects.first() {
        return Ok(first);
    }
    snap.fallback_project.ok_or_else(|| no_project(snap, key))
}

/// 400 `project_required` for a key granted no project, called through no route. Naming a
/// project in `OpenAI-Project` cannot help such a key (it may name only projects it is
/// granted): the operator has to grant it one, or the app has to call through a route.
fn no_project(snap: &Snapshot, key: &Key) -> ProxyError {
    let routes = if snap.routes.is_empty() {
        String::new()
    } else {
        let list = snap
            .routes
            .iter()
            .map(|r| format!("`{}/v1` ({})", r.prefix, snap.projects[r.project].name))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            " Meanwhile the key works through a route, which bills the route's project: {list}."
        )
    };
    ProxyError::ProjectRequired(format!(
        "key `{}` has no project, so this call cannot be billed to one (an `OpenAI-Project` header cannot help: a key may name only projects it is granted). Ask your platform team to grant the key a project: `projects = [\"<project name>\"]` in its [[keys]] entry of the mantlegate config.{routes}",
        key.name
    ))
}

/// Whether this key, through this route, may act on project `p` (by naming it, or by
/// resolving to it without naming any).
#[must_use]
pub fn may_use(snap: &Snapshot, key: &Key, route: Option<&Route>, p: ProjectIdx) -> bool {
    resolve(snap, key, route, Some(&snap.projects[p].id)).is_ok()
        || resolve(snap, key, route, None).is_ok_and(|q| q == p)
}

fn forbidden(snap: &Snapshot, key: &Key, route: Option<&Route>, handle: &str) -> ProxyError {
    let may_use = match route {
        Some(r) => format!(
            "through route `{}` only project `{}` ({})",
            r.prefix, snap.projects[r.project].name, snap.projects[r.project].id
        ),
        None => allowed_list(snap, key),
    };
    // Echo the requested handle only when it is a plain identifier, so a header cannot inject
    // arbitrary text into an error message.
    let shown = if handle.len() <= 128
        && handle
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-. ".contains(&b))
    {
        handle
    } else {
        "(unprintable)"
    };
    ProxyError::ProjectForbidden(format!(
        "key `{}` may not use project `{shown}` (OpenAI-Project header); it may use: {may_use}",
        key.name
    ))
}

fn allowed_list(snap: &Snapshot, key: &Key) -> String {
    if key.projects.is_empty() {
        return "no project of its own (the operator grants it one in its [[keys]] entry: projects = [...])".to_owned();
    }
    key.projects
        .iter()
        .map(|&p| format!("`{}` ({})", snap.projects[p].name, snap.projects[p].id))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn sha(key: &str) -> String {
        hex::encode(Sha256::digest(key.as_bytes()))
    }

    fn snapshot(on_missing: &str) -> Snapshot {
        let text = format!(
            r#"
            [upstream]
            base_url = "https://bedrock-mantle.us-east-1.api.aws"
            [attribution]
            on_missing = "{on_missing}"
            default_project = "Shared"
            [[projects]]
            name = "Chatbot"
            id = "proj_chat"
            [[projects]]
            name = "Search"
            id = "proj_search"
            [[projects]]
            name = "Shared"
            id = "proj_shared"
            [[keys]]
            name = "chatbot"
            sha256 = "{}"
            projects = ["Chatbot"]
            [[keys]]
            name = "multi"
            sha256 = "{}"
            projects = ["Search", "Chatbot"]
            [[keys]]
            name = "bare"
            sha256 = "{}"
            projects = []
            [[routes]]
            prefix = "/search"
            project = "Search"
            [[routes]]
            prefix = "/search/internal"
            project = "Shared"
            "#,
            sha("k-chat"),
            sha("k-multi"),
            sha("k-bare"),
        );
        let config = Config::from_toml(&text).expect("valid");
        Snapshot::build(&config, Some("upstream")).expect("builds")
    }

    fn key<'a>(snap: &'a Snapshot, plain: &str) -> &'a Key {
        authenticate(snap, plain).expect("known key")
    }

    fn name(snap: &Snapshot, r: Result<ProjectIdx, ProxyError>) -> Result<String, &'static str> {
        r.map(|p| snap.projects[p].name.to_string())
            .map_err(|e| e.code())
    }

    #[test]
    fn credential_from_either_header() {
        let mut h = HeaderMap::new();
        assert_eq!(credential(&h).map_err(|e| e.code()), Err("invalid_api_key"));
        h.insert("x-api-key", "k-chat".parse().expect("value"));
        assert_eq!(credential(&h).expect("x-api-key"), "k-chat");
        let mut h = HeaderMap::new();
        h.insert("authorization", "bearer k-chat".parse().expect("value"));
        assert_eq!(credential(&h).expect("bearer"), "k-chat");
        h.insert("authorization", "Basic abc".parse().expect("value"));
        assert!(credential(&h).is_err());
    }

    #[test]
    fn a_sigv4_signed_call_is_told_to_send_a_key_instead() {
        let message = |authorization: &str| {
            let mut h = HeaderMap::new();
            h.insert("authorization", authorization.parse().expect("value"));
            match credential(&h) {
                Err(ProxyError::InvalidApiKey(m)) => m.into_owned(),
                other => panic!("expected invalid_api_key, got {other:?}"),
            }
        };
        let signed = message(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261206/us-east-1/bedrock/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=abc",
        );
        assert!(
            signed.contains("SigV4") && signed.contains("Bearer"),
            "{signed}"
        );
        assert!(
            !signed.contains("AKIDEXAMPLE"),
            "the credential is not echoed"
        );
        let basic = message("Basic abc");
        assert!(
            basic.starts_with("no API key") && !basic.contains("SigV4"),
            "{basic}"
        );
    }

    #[test]
    fn unknown_key_is_401() {
        let s = snapshot("reject");
        let err = authenticate(&s, "k-nope").map(|_| ()).map_err(|e| e.code());
        assert_eq!(err, Err("invalid_api_key"));
    }

    #[test]
    fn header_must_be_one_of_the_keys_projects() {
        let s = snapshot("reject");
        let k = key(&s, "k-multi");
        assert_eq!(
            name(&s, resolve(&s, k, None, Some("proj_chat"))),
            Ok("Chatbot".into())
        );
        assert_eq!(
            name(&s, resolve(&s, k, None, Some("Chatbot"))),
            Ok("Chatbot".into())
        );
        assert_eq!(
            name(&s, resolve(&s, k, None, Some("proj_shared"))),
            Err("project_forbidden")
        );
        assert_eq!(
            name(&s, resolve(&s, k, None, Some("proj_nope"))),
            Err("project_forbidden")
        );
        let bare = key(&s, "k-bare");
        assert_eq!(
            name(&s, resolve(&s, bare, None, Some("proj_chat"))),
            Err("project_forbidden")
        );
    }

    #[test]
    fn forbidden_message_names_the_key_and_what_it_may_use() {
        let s = snapshot("reject");
        let k = key(&s, "k-chat");
        let err = resolve(&s, k, None, Some("proj_search")).expect_err("forbidden");
        let msg = err.to_string();
        assert!(msg.contains("`chatbot`"), "{msg}");
        assert!(msg.contains("proj_chat"), "{msg}");
    }

    #[test]
    fn route_project_wins_and_is_checked_against_the_key() {
        let s = snapshot("reject");
        let route = s.route_for("/search/v1/chat/completions");
        assert_eq!(route.map(|r| &*r.prefix), Some("/search"));
        let nested = s.route_for("/search/internal/v1/responses");
        assert_eq!(nested.map(|r| &*r.prefix), Some("/search/internal"));
        assert!(s.route_for("/searchx/v1/responses").is_none());

        let multi = key(&s, "k-multi");
        assert_eq!(
            name(&s, resolve(&s, multi, route, None)),
            Ok("Search".into())
        );
        let bare = key(&s, "k-bare");
        assert_eq!(
            name(&s, resolve(&s, bare, route, None)),
            Ok("Search".into())
        );
        let chat = key(&s, "k-chat");
        assert_eq!(
            name(&s, resolve(&s, chat, route, None)),
            Err("project_forbidden")
        );
        // Through a route, the header may only name the route's project.
        assert_eq!(
            name(&s, resolve(&s, multi, route, Some("proj_chat"))),
            Err("project_forbidden")
        );
        assert_eq!(
            name(&s, resolve(&s, multi, route, Some("proj_search"))),
            Ok("Search".into())
        );
    }

    #[test]
    fn key_default_then_fallback_then_reject() {
        let s = snapshot("reject");
        assert_eq!(
            name(&s, resolve(&s, key(&s, "k-multi"), None, None)),
            Ok("Search".into())
        );
        assert_eq!(
            name(&s, resolve(&s, key(&s, "k-bare"), None, None)),
            Err("project_required")
        );
        let s = snapshot("default");
        assert_eq!(
            name(&s, resolve(&s, key(&s, "k-bare"), None, None)),
            Ok("Shared".into())
        );
    }
}
