//! Metering: token usage read from what the upstream sends, on the side of the relay.

pub mod sse;
pub mod stream;
pub mod usage;

/// Token counts of one call, in OpenAI's semantics: `cached_input` is part of `input`,
/// `reasoning` is part of `output`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// All input (prompt) tokens, cached ones included.
    pub input: u64,
    /// Input tokens served from the prompt cache.
    pub cached_input: u64,
    /// All output (completion) tokens, reasoning ones included.
    pub output: u64,
    /// Output tokens spent on reasoning.
    pub reasoning: u64,
}

/// Where a call's usage came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    /// The upstream reported it.
    Reported,
    /// The stream ended without a report; estimated from what was relayed.
    Estimated,
    /// Nothing to estimate from.
    Missing,
    /// The call has no usage (a rejection, a model list, a GET of a response...).
    None,
}

impl UsageSource {
    /// Stable lowercase name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reported => "reported",
            Self::Estimated => "estimated",
            Self::Missing => "missing",
            Self::None => "none",
        }
    }
}
