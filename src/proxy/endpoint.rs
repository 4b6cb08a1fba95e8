//! Which forwarded endpoint a path names, after its route prefix and `/v1` (pure).

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

/// Refuses paths whose meaning could change under normalisation: `//`, `.`/`..` segments,
/// backslashes, and percent-escaped `/`, `\` or `.`. Such paths are how
/// `/chatbot/../v1/organization/projects` style tricks reach what they should not.
///
/// # Errors
/// 400 `invalid_path`.
pub fn check_normal(path: &str) -> Result<(), ProxyError> {
    let lower_has = |needle: &str| {
        path.as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
    };
    let bad = !path.starts_with('/')
        || path.contains("//")
        || path.contains('\\')
        || path.split('/').any(|s| s == "." || s == "..")
        // Most paths have no escape at all: one scan for `%` spares the three below.
        || (path.contains('%') && (lower_has("%2e") || lower_has("%2f") || lower_has("%5c")));
    if bad {
        Err(ProxyError::InvalidPath(printable(path)))
    } else {
        Ok(())
    }
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
            assert!(check_normal(p).is_err(), "{p}");
        }
        assert!(check_normal("/chatbot/v1/chat/completions").is_ok());
    }
}
