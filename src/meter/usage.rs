//! Usage and lifecycle facts read from OpenAI Chat Completions and Responses bodies and events.

// Chat streams send one event per token, so nothing here parses a whole document: a byte scan
// finds the few top-level members that matter (skipping strings with `memchr`, so text is never
// mistaken for keys), and only those values go through serde. Everything is lenient: malformed
// input yields `None` or the `Other`/`Error` class, never a panic.

use std::sync::LazyLock;

use memchr::memmem::Finder;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::Usage;

/// Usage of a Chat Completions JSON body or chunk: its top-level `usage` object
/// (`prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens`,
/// `completion_tokens_details.reasoning_tokens`; missing or null counts and details are 0).
///
/// `None` when there is no usage object (absent or null), or when a count in it is negative,
/// fractional or not a number. Cached tokens are capped at the input and reasoning tokens at the
/// output, so [`Usage`]'s "part of" invariants always hold.
#[must_use]
pub fn chat_usage(json: &[u8]) -> Option<Usage> {
    let [usage] = members(json, [b"usage"]);
    chat_usage_at(json, usage?)
}

/// Usage of a Responses API `response` object JSON (`input_tokens`, `output_tokens`,
/// `input_tokens_details.cached_tokens`, `output_tokens_details.reasoning_tokens`), with the same
/// leniency as [`chat_usage`]. Also accepts a stream event that wraps the object in `response`.
#[must_use]
pub fn responses_usage(json: &[u8]) -> Option<Usage> {
    let [usage, response] = members(json, [b"usage", b"response"]);
    match usage {
        Some(at) if !is_null(json, at) => responses_usage_at(json, at),
        _ => {
            let inner = json.get(response?..)?;
            let [usage] = members(inner, [b"usage"]);
            responses_usage_at(inner, usage?)
        }
    }
}

/// One chat stream event's data, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatChunk {
    /// The `[DONE]` sentinel that ends the stream.
    Done,
    /// A chunk with a usable top-level `usage` object.
    Usage {
        /// The usage it reports (for the whole request).
        usage: Usage,
        /// `choices` is empty or absent: the `include_usage` chunk sent after the last content.
        usage_only: bool,
    },
    /// An ordinary chunk with a non-empty `choices` array.
    Content,
    /// A mid-stream error: the chunk has a non-null `error` member.
    Error,
    /// Anything else, including malformed JSON.
    Other,
}

/// Classifies one chat stream event's data. Only a chunk that has a `"usage"` key followed by an
/// object is parsed; any other is classified by a byte scan (tens of nanoseconds per chunk).
#[must_use]
pub fn chat_chunk(data: &[u8]) -> ChatChunk {
    chat_chunk_and_null_usage(data).0
}

/// [`chat_chunk`], and where in `data` the `"usage":null` member that `include_usage` adds to
/// every chunk sits, with the comma that joins it to its neighbour: `(start, length)` of the
/// bytes to cut, found by the same search that looks for a usage object. Only that exact
/// member is found (`,"usage":null`, else `"usage":null,`): inside a JSON string the quotes
/// would be escaped, so it cannot match text.
#[must_use]
pub fn chat_chunk_and_null_usage(raw: &[u8]) -> (ChatChunk, Option<(usize, usize)>) {
    static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
    static CHOICES: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"choices\""));
    static ERROR: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"error\""));
    const NULL_MEMBER: &[u8] = b"\"usage\":null";
    const NULL_LAST: &[u8] = b",\"usage\":null}";

    let data = trim(raw);
    if data.starts_with(b"[DONE]") {
        return (ChatChunk::Done, None);
    }
    let lead = raw.len() - raw.trim_ascii_start().len();
    // The usual chunk ends with the member: then it is the top-level `usage` (the brace after
    // it closes the chunk), it is null, and nothing else in the chunk needs searching for it.
    if data.ends_with(NULL_LAST) {
        let at = data.len() - NULL_LAST.len();
        return (
            classify_without_usage(data, &CHOICES, &ERROR),
            Some((lead + at, NULL_LAST.len() - 1)),
        );
    }
    let mut usage_object = false;
    let (mut comma_before, mut comma_after) = (None, None);
    for at in USAGE.find_iter(data) {
        let colon = skip_ws(data, at + USAGE.needle().len());
        if data.get(colon) != Some(&b':') {
            continue;
        }
        usage_object |= data.get(skip_ws(data, colon + 1)) == Some(&b'{');
        let member = &data[at..];
        if comma_before.is_none()
            && at > 0
            && data[at - 1] == b','
            && member.starts_with(NULL_MEMBER)
        {
            comma_before = Some((lead + at - 1, NULL_MEMBER.len() + 1));
        } else if comma_after.is_none()
            && member.starts_with(NULL_MEMBER)
            && member.get(NULL_MEMBER.len()) == Some(&b',')
        {
            comma_after = Some((lead + at, NULL_MEMBER.len() + 1));
        }
    }
    let null_usage = comma_before.or(comma_after);
    if usage_object {
        let [usage, choices] = members(data, [b"usage", b"choices"]);
        let usage = usage.and_then(|at| chat_usage_at(data, at));
        if let Some(usage) = usage {
            let usage_only = !choices.is_some_and(|at| is_non_empty_array(data, at));
            return (ChatChunk::Usage { usage, usage_only }, null_usage);
        }
    }
    (classify_without_usage(data, &CHOICES, &ERROR), null_usage)
}

/// A chat chunk without a usable usage object: content, error or other.
fn classify_without_usage(data: &[u8], choices: &Finder<'_>, error: &Finder<'_>) -> ChatChunk {
    if has_key(data, choices, |value| is_non_empty_array(value, 0)) {
        ChatChunk::Content
    } else if has_key(data, error, |value| !value.starts_with(b"null")) {
        ChatChunk::Error
    } else {
        ChatChunk::Other
    }
}

/// One Responses stream event, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponsesEvent {
    /// `response.created`, with the new response's id.
    Created {
        /// `response.id`.
        id: String,
    },
    /// `response.completed`, `response.incomplete` or `response.failed`: the last event.
    Terminal {
        /// `response.id`, when readable.
        id: Option<String>,
        /// `response.status`, or when unreadable the event name's suffix (`completed`...).
        status: String,
        /// `response.usage`, when present and usable.
        usage: Option<Usage>,
    },
    /// Any `*.delta` event.
    Delta,
    /// An `error` event, or one of Mantle's malformed error frames: typeless (`{"message":..}`,
    /// `{"error":..}`), stringified JSON, or not JSON at all.
    Error,
    /// Anything else (other lifecycle and item events, `[DONE]`, a typeless object with no
    /// error member, a `response.created` without readable id).
    Other,
}

/// Classifies one Responses stream event. `event` is the SSE `event:` field; when it is absent
/// (or empty) the JSON's top-level `"type"` is used. Only `response.created` and the terminal
/// events are parsed, and only the members they need; the JSON `"type"` is found by a byte scan.
/// A payload that is a JSON string (stringified JSON) is unwrapped once and classified.
#[must_use]
pub fn responses_event(event: Option<&str>, data: &[u8]) -> ResponsesEvent {
    classify(event.filter(|name| !name.is_empty()), trim(data), true)
}

/// The facts of a Responses `response` object (non-stream create answer, or GET /responses/{id}).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseObject {
    /// `id` (`resp_...`).
    pub id: String,
    /// `status`: `queued`, `in_progress`, or terminal (see [`is_terminal`]).
    pub status: String,
    /// `background`; false when absent or null.
    pub background: bool,
    /// `usage`, when present and usable (null until the response is terminal).
    pub usage: Option<Usage>,
}

/// The facts of a Responses `response` object; `None` when it has no string `id` and `status`,
/// or its `object` is something other than `"response"` (an error body, a list...).
#[must_use]
pub fn response_object(json: &[u8]) -> Option<ResponseObject> {
    let facts = Facts::of(json)?;
    if facts
        .object
        .as_deref()
        .is_some_and(|object| object != "response")
    {
        return None;
    }
    Some(ResponseObject {
        id: facts.id?,
        status: facts.status?,
        background: facts.background,
        usage: facts.usage,
    })
}

/// Whether a Responses status is terminal: completed, incomplete, failed, cancelled.
#[must_use]
pub fn is_terminal(status: &str) -> bool {
    matches!(status, "completed" | "incomplete" | "failed" | "cancelled")
}

fn classify(event: Option<&str>, data: &[u8], unwrap: bool) -> ResponsesEvent {
    if data.first() == Some(&b'"') {
        // Mantle sometimes sends a frame's JSON as a JSON string.
        return match serde_json::from_slice::<String>(data) {
            Ok(inner) if unwrap => classify(event, trim(inner.as_bytes()), false),
            _ => ResponsesEvent::Error,
        };
    }
    let kind = match event {
        Some(name) => name,
        None => match json_type(data) {
            Some(kind) => kind,
            None => return typeless(data),
        },
    };
    match kind {
        "response.created" => Facts::of_event(data, false)
            .and_then(|facts| facts.id)
            .map_or(ResponsesEvent::Other, |id| ResponsesEvent::Created { id }),
        "response.completed" | "response.incomplete" | "response.failed" => {
            let facts = Facts::of_event(data, true).unwrap_or_default();
            let status = facts
                .status
                .unwrap_or_else(|| kind.trim_start_matches("response.").to_owned());
            ResponsesEvent::Terminal {
                id: facts.id,
                status,
                usage: facts.usage,
            }
        }
        "error" => ResponsesEvent::Error,
        _ if kind.strip_suffix(".delta").is_some() => ResponsesEvent::Delta,
        _ => ResponsesEvent::Other,
    }
}

/// A frame with neither event name nor JSON type.
fn typeless(data: &[u8]) -> ResponsesEvent {
    if data.is_empty() || data.starts_with(b"[DONE]") {
        return ResponsesEvent::Other;
    }
    if data.first() != Some(&b'{') {
        return ResponsesEvent::Error;
    }
    let [error, message, code] = members(data, [b"error", b"message", b"code"]);
    if error.is_some_and(|at| !is_null(data, at)) || message.is_some() || code.is_some() {
        ResponsesEvent::Error
    } else {
        ResponsesEvent::Other
    }
}

/// The top-level `"type"` string of a JSON object, read without unescaping (types have no
/// escapes; one that does is simply not recognised).
fn json_type(data: &[u8]) -> Option<&str> {
    // The usual layout puts the type first.
    let at = if let Some(rest) = data.strip_prefix(b"{\"type\":") {
        data.len() - rest.len()
    } else {
        members(data, [b"type"])[0]?
    };
    if data.get(at) != Some(&b'"') {
        return None;
    }
    let close = string_end(data, at + 1)?;
    std::str::from_utf8(data.get(at + 1..close)?).ok()
}

/// What the lifecycle needs from a `response` object.
#[derive(Debug, Default)]
struct Facts {
    id: Option<String>,
    status: Option<String>,
    object: Option<String>,
    background: bool,
    usage: Option<Usage>,
}

impl Facts {
    /// The `id`, and with `terminal` the `status` and `usage`, of the `response` object a
    /// stream event wraps. Only those are looked for: `id` comes first in the object, so a
    /// `response.created` event is read no further, where looking for all five members of
    /// [`Facts::of`] walked the whole object (most of a Responses stream's metering cost).
    fn of_event(data: &[u8], terminal: bool) -> Option<Self> {
        let [response] = members(data, [b"response"]);
        let json = data.get(response?..)?;
        let string = |at: Option<usize>| parse_at::<Option<String>>(json, at?).flatten();
        if !terminal {
            let [id] = members(json, [b"id"]);
            return Some(Self {
                id: string(id),
                ..Self::default()
            });
        }
        let [id, status, usage] = members(json, [b"id", b"status", b"usage"]);
        Some(Self {
            id: string(id),
            status: string(status),
            usage: usage.and_then(|at| responses_usage_at(json, at)),
            ..Self::default()
        })
    }

    /// The facts of a `response` object; `None` when `json` is not an object.
    fn of(json: &[u8]) -> Option<Self> {
        if trim(json).first() != Some(&b'{') {
            return None;
        }
        let [id, status, object, background, usage] =
            members(json, [b"id", b"status", b"object", b"background", b"usage"]);
        let string = |at: Option<usize>| parse_at::<Option<String>>(json, at?).flatten();
        Some(Self {
            id: string(id),
            status: string(status),
            object: string(object),
            background: background
                .and_then(|at| parse_at::<Option<bool>>(json, at))
                .flatten()
                .unwrap_or(false),
            usage: usage.and_then(|at| responses_usage_at(json, at)),
        })
    }
}

fn responses_usage_at(json: &[u8], at: usize) -> Option<Usage> {
    match plain_usage(json, at, &RESPONSES_NAMES) {
        Ok(read) => read,
        Err(NotPlain) => parse_at::<Option<ResponsesUsage>>(json, at)??.usage(),
    }
}

/// The Chat Completions `usage` value at `json[at]`.
fn chat_usage_at(json: &[u8], at: usize) -> Option<Usage> {
    match plain_usage(json, at, &CHAT_NAMES) {
        Ok(read) => read,
        Err(NotPlain) => parse_at::<Option<ChatUsage>>(json, at)??.usage(),
    }
}

/// The member names of a usage object: its input and output counts and their details.
struct UsageNames {
    input: &'static [u8],
    input_details: &'static [u8],
    output: &'static [u8],
    output_details: &'static [u8],
}

const CHAT_NAMES: UsageNames = UsageNames {
    input: b"prompt_tokens",
    input_details: b"prompt_tokens_details",
    output: b"completion_tokens",
    output_details: b"completion_tokens_details",
};

const RESPONSES_NAMES: UsageNames = UsageNames {
    input: b"input_tokens",
    input_details: b"input_tokens_details",
    output: b"output_tokens",
    output_details: b"output_tokens_details",
};

/// Reads the usage value at `json[at]` without serde when it has the plain shape upstreams
/// send: `null`, or an object whose members are counts (non-negative integers of at most 19
/// digits, or `null`) and, under the two details names, `null` or objects of counts. Names
/// must be printable ASCII without escapes, and no known name may repeat.
///
/// `Ok(usage)` is what [`ChatUsage`]/[`ResponsesUsage`] through serde give for the same
/// text; `Err(NotPlain)` leaves anything else (floats, strings, escapes, repeats, nesting elsewhere,
/// malformed JSON) to serde, so the billing rules of [`Count`] stay serde's. A test compares
/// the two on random usage objects. Serde's generic path cost about 3,700 instructions per
/// usage object, most of a non-streamed call's metering.
fn plain_usage(json: &[u8], at: usize, names: &UsageNames) -> Result<Option<Usage>, NotPlain> {
    let mut p = Plain { json, at };
    p.ws();
    if p.literal(b"null") {
        return Ok(None);
    }
    let mut input = None;
    let mut output = None;
    let mut cached = None;
    let mut reasoning = None;
    p.object(|p, name| {
        if name == names.input {
            once(&mut input, p.count()?)
        } else if name == names.output {
            once(&mut output, p.count()?)
        } else if name == names.input_details {
            once(&mut cached, p.details(b"cached_tokens")?)
        } else if name == names.output_details {
            once(&mut reasoning, p.details(b"reasoning_tokens")?)
        } else {
            p.count().map(drop)
        }
    })
    .ok_or(NotPlain)?;
    Ok(usage(
        input.unwrap_or_default(),
        cached.and_then(Details::count),
        output.unwrap_or_default(),
        reasoning.and_then(Details::count),
    ))
}

/// A usage value [`plain_usage`] leaves to serde.
#[derive(Debug, PartialEq, Eq)]
struct NotPlain;

/// A details member's value.
#[derive(Clone, Copy)]
enum Details {
    Null,
    /// An object, and the count it holds (0 when absent).
    Object(Count),
}

impl Details {
    fn count(self) -> Option<Count> {
        match self {
            Self::Null => None,
            Self::Object(count) => Some(count),
        }
    }
}

/// Sets a member seen once; a second time gives up (serde refuses repeated fields).
fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

/// A cursor for [`plain_usage`]. Every method returns `None` for what it does not read.
struct Plain<'a> {
    json: &'a [u8],
    at: usize,
}

impl Plain<'_> {
    fn peek(&self) -> Option<u8> {
        self.json.get(self.at).copied()
    }

    /// JSON's whitespace (not `u8::is_ascii_whitespace`, which also takes form feed).
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn literal(&mut self, text: &[u8]) -> bool {
        let found = self
            .json
            .get(self.at..)
            .is_some_and(|rest| rest.starts_with(text));
        if found {
            self.at += text.len();
        }
        found
    }

    fn byte(&mut self, b: u8) -> Option<()> {
        (self.peek() == Some(b)).then(|| self.at += 1)
    }

    /// An object: `member` reads each value, given the name.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
        self.byte(b'{')?;
        self.ws();
        if self.byte(b'}').is_some() {
            return Some(());
        }
        loop {
            self.byte(b'"')?;
            let start = self.at;
            let len = memchr::memchr(b'"', self.json.get(start..)?)?;
            let name = &self.json[start..start + len];
            // Folded without stopping early, which compiles to a vector loop.
            let odd = name.iter().fold(0_u8, |odd, &b| {
                odd | u8::from(!(0x20..0x7f).contains(&b)) | u8::from(b == b'\\')
            });
            if odd != 0 {
                return None;
            }
            self.at = start + len + 1;
            self.ws();
            self.byte(b':')?;
            self.ws();
            member(self, name)?;
            self.ws();
            match self.peek()? {
                b',' => {
                    self.at += 1;
                    self.ws();
                }
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A count: `null` (0) or a non-negative integer of at most 19 digits (below 2^64).
    fn count(&mut self) -> Option<Count> {
        if self.literal(b"null") {
            return Some(Count::default());
        }
        let digits = self.json.get(self.at..)?;
        let len = digits
            .iter()
            .take(20)
            .take_while(|b| b.is_ascii_digit())
            .count();
        // No digits, a leading zero, or more than 19 digits; then no fraction or exponent.
        if len == 0 || len > 19 || (len > 1 && digits[0] == b'0') {
            return None;
        }
        if matches!(digits.get(len), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        let n = digits[..len]
            .iter()
            .fold(0_u64, |n, d| n * 10 + u64::from(d - b'0'));
        self.at += len;
        Some(Count(Some(n)))
    }

    /// A details value: `null`, or an object of counts of which `name` is the one kept.
    fn details(&mut self, name: &[u8]) -> Option<Details> {
        if self.literal(b"null") {
            return Some(Details::Null);
        }
        let mut kept = None;
        self.object(|p, member| {
            if member == name {
                once(&mut kept, p.count()?)
            } else {
                p.count().map(drop)
            }
        })?;
        Some(Details::Object(kept.unwrap_or_default()))
    }
}

/// Chat Completions `usage` (`CompletionUsage`); other members are ignored.
#[derive(Deserialize)]
struct ChatUsage {
    #[serde(default)]
    prompt_tokens: Count,
    #[serde(default)]
    completion_tokens: Count,
    #[serde(default)]
    prompt_tokens_details: Option<CachedDetails>,
    #[serde(default)]
    completion_tokens_details: Option<ReasoningDetails>,
}

impl ChatUsage {
    fn usage(&self) -> Option<Usage> {
        usage(
            self.prompt_tokens,
            self.prompt_tokens_details.as_ref().map(|d| d.cached_tokens),
            self.completion_tokens,
            self.completion_tokens_details
                .as_ref()
                .map(|d| d.reasoning_tokens),
        )
    }
}

/// Responses `usage` (`ResponseUsage`); other members are ignored.
#[derive(Deserialize)]
struct ResponsesUsage {
    #[serde(default)]
    input_tokens: Count,
    #[serde(default)]
    output_tokens: Count,
    #[serde(default)]
    input_tokens_details: Option<CachedDetails>,
    #[serde(default)]
    output_tokens_details: Option<ReasoningDetails>,
}

impl ResponsesUsage {
    fn usage(&self) -> Option<Usage> {
        usage(
            self.input_tokens,
            self.input_tokens_details.as_ref().map(|d| d.cached_tokens),
            self.output_tokens,
            self.output_tokens_details
                .as_ref()
                .map(|d| d.reasoning_tokens),
        )
    }
}

#[derive(Deserialize)]
struct CachedDetails {
    #[serde(default)]
    cached_tokens: Count,
}

#[derive(Deserialize)]
struct ReasoningDetails {
    #[serde(default)]
    reasoning_tokens: Count,
}

/// Builds a [`Usage`]; `None` when any count is unusable. Details that claim more than their
/// total are capped at it.
fn usage(
    input: Count,
    cached: Option<Count>,
    output: Count,
    reasoning: Option<Count>,
) -> Option<Usage> {
    let input = input.0?;
    let output = output.0?;
    let cached = cached.unwrap_or_default().0?;
    let reasoning = reasoning.unwrap_or_default().0?;
    Some(Usage {
        input,
        cached_input: cached.min(input),
        output,
        reasoning: reasoning.min(output),
    })
}

/// A token count: a non-negative integer, or null (0). Anything else (negative, fractional,
/// a string...) is kept as `None`, which makes the whole usage unusable, without failing the
/// parse of what surrounds it.
#[derive(Debug, Clone, Copy)]
struct Count(Option<u64>);

impl Default for Count {
    fn default() -> Self {
        Self(Some(0))
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CountVisitor)
    }
}

struct CountVisitor;

impl<'de> Visitor<'de> for CountVisitor {
    type Value = Count;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a token count")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
        Ok(Count(Some(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
        Ok(Count(u64::try_from(v).ok()))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
        Ok(Count::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<Count, E> {
        Ok(Count::default())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Count(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Count(None))
    }
}

/// Deserializes the JSON value that starts at `json[at]`, ignoring what follows it.
fn parse_at<'a, T: Deserialize<'a>>(json: &'a [u8], at: usize) -> Option<T> {
    let mut de = serde_json::Deserializer::from_slice(json.get(at..)?);
    T::deserialize(&mut de).ok()
}

/// Offsets of the values of `keys` among the members of the object `json` starts with (after
/// whitespace): the first occurrence of each key, at the top level only. Keys are compared
/// as raw bytes (an escaped key is not recognised). Stops at the end of that object, or once
/// every key is found; tolerates truncated input.
fn members<const N: usize>(json: &[u8], keys: [&[u8]; N]) -> [Option<usize>; N] {
    let mut found = [None; N];
    let mut missing = N;
    let mut at = skip_ws(json, 0);
    if json.get(at) != Some(&b'{') {
        return found;
    }
    let mut depth = 0_usize;
    while let Some(&byte) = json.get(at) {
        match byte {
            b'"' => {
                let Some(close) = string_end(json, at + 1) else {
                    break;
                };
                if depth == 1 {
                    let colon = skip_ws(json, close + 1);
                    if json.get(colon) == Some(&b':') {
                        let name = &json[at + 1..close];
                        if let Some(slot) = keys
                            .iter()
                            .position(|key| *key == name)
                            .and_then(|k| found.get_mut(k))
                            .filter(|slot| slot.is_none())
                        {
                            *slot = Some(skip_ws(json, colon + 1));
                            missing -= 1;
                            if missing == 0 {
                                break;
                            }
                        }
                    }
                }
                at = close + 1;
            }
            b'{' | b'[' => {
                depth += 1;
                at += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    break;
                }
                at += 1;
            }
            _ => at += 1,
        }
    }
    found
}

/// Whether `data` has `key` (a quoted name found by `finder`) used as a member name whose value
/// satisfies `value`. Anywhere in the document: a cheap filter, not a parse. A quoted name inside
/// a string cannot match, as its quotes are escaped there.
fn has_key(data: &[u8], finder: &Finder<'_>, value: impl Fn(&[u8]) -> bool) -> bool {
    let len = finder.needle().len();
    // `find` from each match on rather than `find_iter`, whose set-up (a copy of the searcher)
    // costs more than the search itself in a chunk of a few hundred bytes.
    let mut from = 0;
    while let Some(found) = data.get(from..).and_then(|rest| finder.find(rest)) {
        let at = from + found;
        let colon = skip_ws(data, at + len);
        if data.get(colon) == Some(&b':')
            && data.get(skip_ws(data, colon + 1)..).is_some_and(&value)
        {
            return true;
        }
        from = at + 1;
    }
    false
}

/// Index of the `"` closing the string whose content starts at `at`.
fn string_end(json: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let found = quote_or_escape(json, at)?;
        if json[found] == b'"' {
            return Some(found);
        }
        // Skip the escaped character, which may be a quote.
        at = found + 2;
    }
}

/// Words [`quote_or_escape`] reads eight bytes at a time before handing over to memchr.
const SHORT_WORDS: usize = 4;

/// Index of the first `"` or `\` at or after `at`.
///
/// Most strings in an answer are short (member names, ids, enum values). memchr's set-up costs
/// more than the search for them, and a byte loop costs more per byte (both counted with
/// callgrind), so the first 32 bytes are searched a word at a time: for each of the two bytes,
/// the classic has-zero-byte test on the word exclusive-or that byte. The lowest bit set is
/// the first match; the test's false positives only ever lie above a true one. Longer strings
/// (the content) go on to memchr.
fn quote_or_escape(json: &[u8], mut at: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero_bytes = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    for _ in 0..SHORT_WORDS {
        let Some(word) = json.get(at..at + 8) else {
            break;
        };
        let mut bytes = [0_u8; 8];
        bytes.copy_from_slice(word);
        let x = u64::from_le_bytes(bytes);
        let hits =
            zero_bytes(x ^ (ONES * u64::from(b'"'))) | zero_bytes(x ^ (ONES * u64::from(b'\\')));
        if hits != 0 {
            return Some(at + (hits.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    Some(at + memchr::memchr2(b'"', b'\\', json.get(at..)?)?)
}

fn is_non_empty_array(json: &[u8], at: usize) -> bool {
    json.get(at) == Some(&b'[')
        && json
            .get(skip_ws(json, at + 1))
            .is_some_and(|&next| next != b']')
}

fn is_null(json: &[u8], at: usize) -> bool {
    json.get(at..)
        .is_some_and(|value| value.starts_with(b"null"))
}

fn skip_ws(json: &[u8], mut at: usize) -> usize {
    while json.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

fn trim(data: &[u8]) -> &[u8] {
    data.trim_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_null_usage_to_cut_is_found_with_its_comma_and_nothing_else_is() {
        let cut = |data: &str| {
            let (class, at) = chat_chunk_and_null_usage(data.as_bytes());
            let kept = at.map(|(start, len)| format!("{}{}", &data[..start], &data[start + len..]));
            (class, kept)
        };
        let (class, kept) = cut(
            r#" {"id":"c","choices":[{"delta":{"content":"say \"usage\":null,"}}],"usage":null}"#,
        );
        assert_eq!(class, ChatChunk::Content);
        assert_eq!(
            kept.as_deref(),
            Some(r#" {"id":"c","choices":[{"delta":{"content":"say \"usage\":null,"}}]}"#),
            "the member, not the text that looks like it, and offsets past the leading space"
        );
        // A usage object nested deeper does not make the top-level null one usage.
        let (class, kept) =
            cut(r#"{"choices":[{"delta":{"x":{"usage":{"prompt_tokens":1}}}}],"usage":null}"#);
        assert_eq!(class, ChatChunk::Content);
        assert_eq!(
            kept.as_deref(),
            Some(r#"{"choices":[{"delta":{"x":{"usage":{"prompt_tokens":1}}}}]}"#)
        );
        let (class, kept) = cut(r#"{"choices":[],"usage":null}"#);
        assert_eq!(
            (class, kept.as_deref()),
            (ChatChunk::Other, Some(r#"{"choices":[]}"#))
        );
        let (_, kept) = cut(r#"{"usage":null,"id":"c","choices":[{"delta":{}}]}"#);
        assert_eq!(
            kept.as_deref(),
            Some(r#"{"id":"c","choices":[{"delta":{}}]}"#)
        );
        assert_eq!(cut(r#"{"id":"c","choices":[{}],"usage": null}"#).1, None);
        assert_eq!(cut(r#"{"id":"c","choices":[{}]}"#).1, None);
        let (class, kept) =
            cut(r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#);
        assert!(matches!(
            class,
            ChatChunk::Usage {
                usage_only: true,
                ..
            }
        ));
        assert_eq!(kept, None);
    }

    fn u(input: u64, cached_input: u64, output: u64, reasoning: u64) -> Usage {
        Usage {
            input,
            cached_input,
            output,
            reasoning,
        }
    }

    const CHAT_BODY: &str = r#"{
      "id": "chatcmpl-abc", "object": "chat.completion", "created": 1754000000,
      "model": "openai.gpt-oss-120b",
      "choices": [{"index": 0, "message": {"role": "assistant",
        "content": "The \"usage\": {\"prompt_tokens\": 999} field is what you want.",
        "reasoning_content": "usage"}, "finish_reason": "stop"}],
      "usage": {"prompt_tokens": 120, "completion_tokens": 45, "total_tokens": 165,
        "prompt_tokens_details": {"cached_tokens": 100, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 30, "audio_tokens": 0,
          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
      "service_tier": "default", "system_fingerprint": null
    }"#;

    /// Usage objects made of random parts, plain and not: every one the plain reader takes
    /// must come out as serde reads it.
    fn random_usage_texts(names: &UsageNames, count: usize) -> Vec<Vec<u8>> {
        use std::fmt::Write as _;
        // A fixed xorshift: the same cases on every run, no generator to seed.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % (n as u64)).expect("small")
        };
        let name = |s: &[u8]| String::from_utf8(s.to_vec()).expect("ascii");
        let keys = [
            name(names.input),
            name(names.output),
            name(names.input_details),
            name(names.output_details),
            "total_tokens".to_owned(),
            "audio_tokens".to_owned(),
            format!(
                "{}\\u0073",
                &name(names.input)[..name(names.input).len() - 1]
            ),
            "caf\u{e9}".to_owned(),
        ];
        let counts = [
            "0",
            "7",
            "123",
            "null",
            "-1",
            "-0",
            "1.5",
            "1e3",
            "2E1",
            "01",
            "00",
            "9999999999999999999",
            "18446744073709551615",
            "99999999999999999999",
            "\"5\"",
            "true",
            "[1]",
            "{}",
            "12x",
        ];
        let details = [
            "null",
            "{}",
            "{\"cached_tokens\":3}",
            "{\"reasoning_tokens\":4}",
            "{\"cached_tokens\":null,\"audio_tokens\":0}",
            "{\"reasoning_tokens\":9,\"x\":1}",
            "{\"cached_tokens\":1,\"cached_tokens\":2}",
            "{\"reasoning_tokens\":1.0}",
            "{\"cached_tokens\":2,}",
            "[3]",
            "{\"reasoning_tokens\":\"3\"}",
            "{\"cached_tokens\":5,\"reasoning_tokens\":6}",
        ];
        let spaces = ["", "", "", " ", "\n  ", "\t", "\r\n", "\u{c}"];
        (0..count)
            .map(|_| {
                let mut text = String::from(spaces[next(spaces.len())]);
                text.push('{');
                let members = next(7);
                for i in 0..members {
                    if i > 0 {
                        text.push(',');
                    }
                    text.push_str(spaces[next(spaces.len())]);
                    let key = &keys[next(keys.len())];
                    let is_details = key.ends_with("_details");
                    let value = if is_details && next(4) > 0 {
                        details[next(details.len())]
                    } else {
                        counts[next(counts.len())]
                    };
                    let _ = write!(
                        text,
                        "\"{key}\"{}:{}{value}",
                        spaces[next(3)],
                        spaces[next(3)]
                    );
                }
                match next(12) {
                    0 => text.push_str(",}"),
                    1 => {}
                    _ => text.push('}'),
                }
                text.push_str(spaces[next(spaces.len())]);
                // Cut anywhere, inside a character too: the readers take bytes.
                let text = text.into_bytes();
                match next(10) {
                    0 => b"null".to_vec(),
                    1 => text[..next(text.len() + 1)].to_vec(),
                    _ => text,
                }
            })
            .collect()
    }

    #[test]
    fn the_plain_usage_reader_agrees_with_serde_wherever_it_reads() {
        for (names, slow) in [
            (
                &CHAT_NAMES,
                (|t: &[u8]| parse_at::<Option<ChatUsage>>(t, 0)??.usage()) as fn(&[u8]) -> _,
            ),
            (&RESPONSES_NAMES, |t: &[u8]| {
                parse_at::<Option<ResponsesUsage>>(t, 0)??.usage()
            }),
        ] {
            let mut read = 0;
            let texts = random_usage_texts(names, 20_000);
            for text in &texts {
                if let Ok(fast) = plain_usage(text, 0, names) {
                    read += 1;
                    assert_eq!(fast, slow(text), "{}", String::from_utf8_lossy(text));
                }
            }
            // The plain reader takes a good share of them (and the rest go to serde).
            assert!(read > texts.len() / 10 && read < texts.len(), "{read}");
        }
    }

    #[test]
    fn usage_as_upstreams_send_it_is_read_without_serde() {
        let chat = r#"{"prompt_tokens": 120, "completion_tokens": 45, "total_tokens": 165,
            "prompt_tokens_details": {"cached_tokens": 100, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 30, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}"#;
        assert_eq!(
            plain_usage(chat.as_bytes(), 0, &CHAT_NAMES),
            Ok(Some(u(120, 100, 45, 30)))
        );
        let responses = r#"{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},
            "output_tokens":87,"output_tokens_details":{"reasoning_tokens":12},"total_tokens":123}"#;
        assert_eq!(
            plain_usage(responses.as_bytes(), 0, &RESPONSES_NAMES),
            Ok(Some(u(36, 0, 87, 12)))
        );
        // Left to serde: a float, a string, an escaped name, a repeated name.
        for text in [
            r#"{"prompt_tokens":1.0}"#,
            r#"{"prompt_tokens":"1"}"#,
            r#"{"prompt\u005ftokens":1}"#,
            r#"{"prompt_tokens":1,"prompt_tokens":2}"#,
        ] {
            assert_eq!(
                plain_usage(text.as_bytes(), 0, &CHAT_NAMES),
                Err(NotPlain),
                "{text}"
            );
        }
    }

    #[test]
    fn chat_usage_reads_totals_and_details() {
        assert_eq!(chat_usage(CHAT_BODY.as_bytes()), Some(u(120, 100, 45, 30)));
        // Details absent, null, or with null counts are 0.
        for body in [
            r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":40,"total_tokens":52}}"#,
            r#"{"usage":{"prompt_tokens":12,"completion_tokens":40,"prompt_tokens_details":null,"completion_tokens_details":null}}"#,
            r#"{"usage":{"prompt_tokens":12,"completion_tokens":40,"prompt_tokens_details":{"cached_tokens":null},"completion_tokens_details":{}}}"#,
        ] {
            assert_eq!(chat_usage(body.as_bytes()), Some(u(12, 0, 40, 0)), "{body}");
        }
        // Missing or null totals are 0 too.
        assert_eq!(
            chat_usage(br#"{"usage":{"prompt_tokens":null,"completion_tokens":3}}"#),
            Some(u(0, 0, 3, 0))
        );
    }

    #[test]
    fn chat_usage_is_none_without_a_usable_usage() {
        for body in [
            r#"{"id":"x","choices":[]}"#,
            r#"{"id":"x","choices":[],"usage":null}"#,
            r#"{"usage":{"prompt_tokens":-1,"completion_tokens":3}}"#,
            r#"{"usage":{"prompt_tokens":1.5,"completion_tokens":3}}"#,
            r#"{"usage":{"prompt_tokens":"12","completion_tokens":3}}"#,
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":3,"completion_tokens_details":{"reasoning_tokens":-2}}}"#,
            r#"{"usage":{"prompt_tokens":1e3,"completion_tokens":3}}"#,
            r#"{"usage":{"prompt_tokens":99999999999999999999999,"completion_tokens":3}}"#,
            r#"{"usage":"n/a"}"#,
            r#"{"usage":{"prompt_tokens":1,"#,
            r#"{"error":{"code":"validation_error","message":"Failed to deserialize"}}"#,
            r#"{"data":{"usage":{"prompt_tokens":1,"completion_tokens":1}}}"#,
            "not json",
            "",
            "[1,2]",
        ] {
            assert_eq!(chat_usage(body.as_bytes()), None, "{body}");
        }
    }

    #[test]
    fn details_are_capped_at_their_totals() {
        assert_eq!(
            chat_usage(br#"{"usage":{"prompt_tokens":5,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":9},"completion_tokens_details":{"reasoning_tokens":4}}}"#),
            Some(u(5, 5, 3, 3))
        );
    }

    const CONTENT: &str = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"openai.gpt-oss-120b","choices":[{"index":0,"delta":{"content":" world"},"finish_reason":null}],"usage":null}"#;
    const FINISH: &str = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"openai.gpt-oss-120b","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#;
    const USAGE_ONLY: &str = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"openai.gpt-oss-120b","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":40,"total_tokens":52,"prompt_tokens_details":{"cached_tokens":8},"completion_tokens_details":{"reasoning_tokens":16}}}"#;

    #[test]
    fn chat_chunks_are_classified() {
        assert_eq!(chat_chunk(CONTENT.as_bytes()), ChatChunk::Content);
        assert_eq!(chat_chunk(FINISH.as_bytes()), ChatChunk::Content);
        assert_eq!(
            chat_chunk(USAGE_ONLY.as_bytes()),
            ChatChunk::Usage {
                usage: u(12, 8, 40, 16),
                usage_only: true
            }
        );
        assert_eq!(chat_chunk(b"[DONE]"), ChatChunk::Done);
        assert_eq!(chat_chunk(b" [DONE]\n"), ChatChunk::Done);
        // Chunks without `usage` at all (include_usage off), and the role chunk.
        assert_eq!(
            chat_chunk(br#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#),
            ChatChunk::Content
        );
        // A gateway that puts usage on the last content chunk.
        assert_eq!(
            chat_chunk(br#"{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#),
            ChatChunk::Usage {
                usage: u(3, 0, 4, 0),
                usage_only: false
            }
        );
        // A usage chunk with no `choices` member is usage-only too.
        assert_eq!(
            chat_chunk(br#"{ "usage" : { "prompt_tokens" : 1 , "completion_tokens" : 2 } }"#),
            ChatChunk::Usage {
                usage: u(1, 0, 2, 0),
                usage_only: true
            }
        );
    }

    #[test]
    fn chat_chunk_text_that_looks_like_usage_is_content() {
        let chunk = r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"set \"usage\": {\"prompt_tokens\": 5, \"completion_tokens\": 7} and \"error\": {} here"},"finish_reason":null}],"usage":null}"#;
        assert_eq!(chat_chunk(chunk.as_bytes()), ChatChunk::Content);
        // Tool-call arguments are a string too.
        let chunk = r#"{"id":"c","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"usage\":{\"prompt_tokens\":1}}"}}]},"finish_reason":null}]}"#;
        assert_eq!(chat_chunk(chunk.as_bytes()), ChatChunk::Content);
        // A nested `usage` object is not the chunk's usage.
        let chunk = r#"{"id":"c","choices":[{"index":0,"delta":{"usage":{"prompt_tokens":1,"completion_tokens":2}},"finish_reason":null}],"usage":null}"#;
        assert_eq!(chat_chunk(chunk.as_bytes()), ChatChunk::Content);
        // Text ending in a backslash before the next member.
        let chunk = r#"{"choices":[{"delta":{"content":"a\\"}}],"usage":null}"#;
        assert_eq!(chat_chunk(chunk.as_bytes()), ChatChunk::Content);
    }

    #[test]
    fn chat_chunk_errors_and_others() {
        assert_eq!(
            chat_chunk(br#"{"error":{"message":"Internal error","type":"api_error","param":null,"code":null}}"#),
            ChatChunk::Error
        );
        assert_eq!(
            chat_chunk(br#"{"error": "upstream closed"}"#),
            ChatChunk::Error
        );
        assert_eq!(chat_chunk(br#"{"error":null,"id":"c"}"#), ChatChunk::Other);
        assert_eq!(
            chat_chunk(br#"{"id":"c","choices":[],"usage":null}"#),
            ChatChunk::Other
        );
        assert_eq!(chat_chunk(b""), ChatChunk::Other);
        assert_eq!(chat_chunk(b"{\"choices\":[{"), ChatChunk::Content);
        assert_eq!(chat_chunk(b"garbage"), ChatChunk::Other);
        // Usage that cannot be used falls back to the cheap classes.
        assert_eq!(
            chat_chunk(br#"{"choices":[],"usage":{"prompt_tokens":-4,"completion_tokens":2}}"#),
            ChatChunk::Other
        );
        assert_eq!(
            chat_chunk(
                br#"{"choices":[{"index":0}],"usage":{"prompt_tokens":1,"completion_tokens":2.5}}"#
            ),
            ChatChunk::Content
        );
    }

    const CREATED: &str = r#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_68a1","object":"response","created_at":1754000000,"status":"in_progress","background":false,"error":null,"incomplete_details":null,"model":"openai.gpt-oss-120b","output":[],"usage":null,"metadata":{}}}"#;
    const COMPLETED: &str = r#"{"type":"response.completed","sequence_number":9,"response":{"id":"resp_68a1","object":"response","created_at":1754000000,"status":"completed","error":null,"model":"openai.gpt-oss-120b","output":[{"id":"msg_1","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"the \"status\":\"failed\" \"usage\":{} text","annotations":[]}]}],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":16},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":64},"total_tokens":123}}}"#;

    #[test]
    fn lifecycle_events_read_top_level_members_in_any_order() {
        // Nested objects carry their own `id`, `status` and `usage` before the response's.
        let created = r#"{"type":"response.created","response":{"output":[{"id":"msg_0","status":"done"}],"metadata":{"id":"meta"},"id":"resp_late","status":"in_progress"}}"#;
        assert_eq!(
            responses_event(Some("response.created"), created.as_bytes()),
            ResponsesEvent::Created {
                id: "resp_late".into()
            }
        );
        let completed = r#"{"type":"response.completed","response":{"usage":{"input_tokens":3,"output_tokens":4},"output":[{"id":"msg_1","status":"in_progress","usage":{"input_tokens":99}}],"status":"completed","id":"resp_late"}}"#;
        assert_eq!(
            responses_event(Some("response.completed"), completed.as_bytes()),
            ResponsesEvent::Terminal {
                id: Some("resp_late".into()),
                status: "completed".into(),
                usage: Some(u(3, 0, 4, 0)),
            }
        );
    }

    #[test]
    fn responses_lifecycle_events() {
        let created = ResponsesEvent::Created {
            id: "resp_68a1".into(),
        };
        assert_eq!(
            responses_event(Some("response.created"), CREATED.as_bytes()),
            created
        );
        assert_eq!(responses_event(None, CREATED.as_bytes()), created);
        let completed = ResponsesEvent::Terminal {
            id: Some("resp_68a1".into()),
            status: "completed".into(),
            usage: Some(u(36, 16, 87, 64)),
        };
        assert_eq!(
            responses_event(Some("response.completed"), COMPLETED.as_bytes()),
            completed
        );
        assert_eq!(responses_event(None, COMPLETED.as_bytes()), completed);
        let incomplete = r#"{"type":"response.incomplete","sequence_number":5,"response":{"id":"resp_2","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"usage":{"input_tokens":10,"output_tokens":64}}}"#;
        assert_eq!(
            responses_event(Some("response.incomplete"), incomplete.as_bytes()),
            ResponsesEvent::Terminal {
                id: Some("resp_2".into()),
                status: "incomplete".into(),
                usage: Some(u(10, 0, 64, 0))
            }
        );
        let failed = r#"{"type":"response.failed","sequence_number":3,"response":{"id":"resp_3","status":"failed","error":{"code":"server_error","message":"boom"},"usage":null}}"#;
        assert_eq!(
            responses_event(Some("response.failed"), failed.as_bytes()),
            ResponsesEvent::Terminal {
                id: Some("resp_3".into()),
                status: "failed".into(),
                usage: None
            }
        );
        // A terminal event that cannot be read is still terminal.
        assert_eq!(
            responses_event(Some("response.completed"), b"{\"response\":"),
            ResponsesEvent::Terminal {
                id: None,
                status: "completed".into(),
                usage: None
            }
        );
        // Bad counts lose the usage, not the id.
        assert_eq!(
            responses_event(
                Some("response.completed"),
                br#"{"response":{"id":"r","status":"completed","usage":{"input_tokens":-1,"output_tokens":2}}}"#
            ),
            ResponsesEvent::Terminal {
                id: Some("r".into()),
                status: "completed".into(),
                usage: None
            }
        );
        // The JSON type is found wherever it is (this layout is alphabetical).
        let delta = r#"{"content_index":0,"delta":"Hi","item_id":"msg_1","logprobs":[],"output_index":0,"sequence_number":4,"type":"response.output_text.delta"}"#;
        assert_eq!(
            responses_event(None, delta.as_bytes()),
            ResponsesEvent::Delta
        );
        assert_eq!(
            responses_event(Some("response.output_text.delta"), b"{}"),
            ResponsesEvent::Delta
        );
        assert_eq!(
            responses_event(Some("response.function_call_arguments.delta"), b""),
            ResponsesEvent::Delta
        );
        assert_eq!(
            responses_event(Some("response.in_progress"), CREATED.as_bytes()),
            ResponsesEvent::Other
        );
        assert_eq!(
            responses_event(
                None,
                br#"{"type":"response.output_item.added","item":{"type":"message"}}"#
            ),
            ResponsesEvent::Other
        );
        // An empty event name counts as absent.
        assert_eq!(responses_event(Some(""), CREATED.as_bytes()), created);
        assert_eq!(responses_event(None, b"[DONE]"), ResponsesEvent::Other);
        assert_eq!(
            responses_event(Some("response.created"), b"{}"),
            ResponsesEvent::Other
        );
    }

    #[test]
    fn responses_error_frames_including_malformed_ones() {
        // The SDK's shape and the captured one.
        let sdk = r#"{"type":"error","code":"server_error","message":"boom","param":null,"sequence_number":2}"#;
        let captured = r#"{"type":"error","sequence_number":2,"error":{"code":"server_error","message":"boom","param":null}}"#;
        for data in [sdk, captured] {
            assert_eq!(
                responses_event(Some("error"), data.as_bytes()),
                ResponsesEvent::Error
            );
            assert_eq!(
                responses_event(None, data.as_bytes()),
                ResponsesEvent::Error
            );
        }
        // Mantle: typeless, null code, no sequence number, stringified JSON, not JSON.
        for (event, data) in [
            (None, r#"{"message":"Internal server error"}"#),
            (None, r#"{"error":{"code":null,"message":"throttled"}}"#),
            (None, r#"{"code":null,"message":"x"}"#),
            (
                Some("error"),
                r#"{"type":"error","code":null,"message":"x","param":null}"#,
            ),
            (
                Some("error"),
                r#""{\"type\":\"error\",\"code\":\"server_error\",\"message\":\"x\"}""#,
            ),
            (
                None,
                r#""{\"type\":\"error\",\"code\":\"server_error\",\"message\":\"x\"}""#,
            ),
            (None, r#""{\"message\":\"x\"}""#),
            (None, r#""Internal server error""#),
            (None, "upstream connect error"),
            (Some("error"), "not json"),
        ] {
            assert_eq!(
                responses_event(event, data.as_bytes()),
                ResponsesEvent::Error,
                "{data}"
            );
        }
        // A stringified terminal event still counts.
        let stringified = serde_json::to_string(COMPLETED).unwrap();
        assert!(matches!(
            responses_event(Some("response.completed"), stringified.as_bytes()),
            ResponsesEvent::Terminal { usage: Some(_), .. }
        ));
        // A typeless object that is not an error.
        assert_eq!(
            responses_event(None, br#"{"error":null,"x":1}"#),
            ResponsesEvent::Other
        );
    }

    #[test]
    fn response_objects() {
        let queued = r#"{"id":"resp_bg1","object":"response","created_at":1754000000,"status":"queued","background":true,"error":null,"output":[],"usage":null}"#;
        assert_eq!(
            response_object(queued.as_bytes()),
            Some(ResponseObject {
                id: "resp_bg1".into(),
                status: "queued".into(),
                background: true,
                usage: None
            })
        );
        let done = r#"{
          "id": "resp_bg1", "object": "response", "created_at": 1754000000, "status": "completed",
          "background": true, "model": "openai.gpt-oss-120b",
          "output": [{"type": "reasoning", "id": "rs_1", "status": "completed", "summary": []},
                     {"type": "message", "id": "msg_1", "status": "completed",
                      "content": [{"type": "output_text", "text": "{\"id\":\"fake\"}"}]}],
          "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                    "output_tokens": 87, "output_tokens_details": {"reasoning_tokens": 64}, "total_tokens": 123}
        }"#;
        let object = response_object(done.as_bytes()).unwrap();
        assert_eq!(object.id, "resp_bg1");
        assert!(is_terminal(&object.status));
        assert_eq!(object.usage, Some(u(36, 0, 87, 64)));
        assert_eq!(responses_usage(done.as_bytes()), Some(u(36, 0, 87, 64)));
        // The stream-event wrapper works for `responses_usage`.
        assert_eq!(
            responses_usage(COMPLETED.as_bytes()),
            Some(u(36, 16, 87, 64))
        );
        assert_eq!(responses_usage(CREATED.as_bytes()), None);
        // Without details, `background` absent or null.
        let plain = br#"{"id":"resp_1","status":"incomplete","background":null,"usage":{"input_tokens":5,"output_tokens":6,"total_tokens":11}}"#;
        assert_eq!(
            response_object(plain),
            Some(ResponseObject {
                id: "resp_1".into(),
                status: "incomplete".into(),
                background: false,
                usage: Some(u(5, 0, 6, 0))
            })
        );
        for body in [
            r#"{"error":{"code":"validation_error","message":"Failed to deserialize the JSON body"}}"#,
            r#"{"object":"list","data":[{"id":"msg_1","status":"completed"}],"id":"x","status":"y"}"#,
            r#"{"id":"resp_1"}"#,
            r#"{"id":7,"status":"completed"}"#,
            "[]",
            "",
        ] {
            assert_eq!(response_object(body.as_bytes()), None, "{body}");
        }
    }

    #[test]
    fn terminal_statuses() {
        for status in ["completed", "incomplete", "failed", "cancelled"] {
            assert!(is_terminal(status));
        }
        for status in ["queued", "in_progress", "", "Completed"] {
            assert!(!is_terminal(status));
        }
    }

    #[test]
    fn the_end_of_a_string_is_found_wherever_it_is() {
        // Random strings up to 40 bytes long, searched from any position: a word at a time
        // for the first 32 bytes, memchr after, agree with a plain scan.
        fn reference(json: &[u8], mut at: usize) -> Option<usize> {
            while at < json.len() {
                match json[at] {
                    b'"' => return Some(at),
                    b'\\' => at += 2,
                    _ => at += 1,
                }
            }
            None
        }
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            usize::try_from(seed % n).expect("small")
        };
        for _ in 0..20_000 {
            let len = next(41);
            // Quotes, escapes, their neighbours, and bytes that differ from them only in
            // the top bit (0xa2, 0xdc) or are zero: the word-at-a-time search must not
            // mistake any of them.
            let text: Vec<u8> = (0..len)
                .map(|_| b"ab\\\"xy z\x00\x01!#[]\xa2\xdc\xc3\xa9"[next(18)])
                .collect();
            for at in 0..=len + 1 {
                assert_eq!(
                    string_end(&text, at),
                    reference(&text, at),
                    "{:?} from {at}",
                    String::from_utf8_lossy(&text)
                );
            }
        }
    }

    #[test]
    fn members_skips_strings_and_nesting() {
        let json = br#" {"a\"b":"x\\","n":{"k":1},"m":[{"k":2}], "k" : 3, "k": 4}"#;
        let [k, n, missing] = members(json, [b"k", b"n", b"zz"]);
        assert_eq!(&json[k.unwrap()..], b"3, \"k\": 4}");
        assert_eq!(json[n.unwrap()], b'{');
        assert_eq!(missing, None);
        // Truncated and hostile input never panics.
        for json in [
            &b"{\"k"[..],
            b"{\"k\":",
            b"{\"\\",
            b"{{{{",
            b"}}}",
            b"{\"k\\\"",
            b"\"",
        ] {
            let _ = members(json, [b"k"]);
            let _ = chat_chunk(json);
            let _ = responses_event(None, json);
            let _ = response_object(json);
        }
    }
}
