//! The few facts the proxy needs from a request body, read in one validating pass, and the
//! one change it ever makes to a body (`include_usage`, spliced in as bytes).
//!
//! Hand-written visitor rather than `#[derive(Deserialize)]`: it insists on a JSON object
//! (derive also accepts arrays for structs), keeps borrowed strings, and is lenient about the
//! types of fields it only peeks at, leaving type errors to bedrock-mantle's own validation.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::endpoint::Endpoint;

/// What the proxy reads from a JSON request body.
#[derive(Debug, Default, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent JSON booleans of the request, not a state machine"
)]
pub struct RequestFacts<'a> {
    /// `model`, when it is a string.
    pub model: Option<Cow<'a, str>>,
    /// `stream`, when it is a boolean.
    pub stream: bool,
    /// Whether the body has a `stream_options` key at all.
    pub has_stream_options: bool,
    /// `stream_options.include_usage`, when it is a boolean.
    pub include_usage: bool,
    /// `max_tokens`: Chat Completions' older output cap.
    pub max_tokens: Cap,
    /// `max_completion_tokens`: Chat Completions' output cap.
    pub max_completion_tokens: Cap,
    /// `max_output_tokens`: the Responses API's output cap.
    pub max_output_tokens: Cap,
    /// `background`, when it is a boolean.
    pub background: bool,
    /// `previous_response_id`, when it is a string: a stored response the call builds on.
    pub previous_response_id: Option<Cow<'a, str>>,
}

/// One output-cap member, read as a lenient (Pydantic-style) upstream would read it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Cap {
    /// Not sent, or `null`: the upstream applies its own limit (or the next member).
    #[default]
    Absent,
    /// A positive whole number of tokens: a JSON integer, a float with no fraction (`1e5`,
    /// `100.0`) or a string of digits, saturating at `u64::MAX`.
    Tokens(u64),
    /// Anything else (`0`, negative, fractional, `true`, text, an array or object): a cap the
    /// upstream refuses or reads its own way, so nothing to trust; admission assumes the
    /// model's ceiling (never the next member, which could be a decoy).
    Unusable,
}

impl Cap {
    /// From a string of ASCII digits (optionally padded with whitespace), as lax parsers read it.
    fn from_text(text: &str) -> Self {
        let digits = text.trim_matches(|c: char| c.is_ascii_whitespace());
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Self::Unusable;
        }
        // All digits: only too many of them can fail, which saturates.
        Self::from_u64(digits.parse().unwrap_or(u64::MAX))
    }

    fn from_u64(n: u64) -> Self {
        if n == 0 {
            Self::Unusable
        } else {
            Self::Tokens(n)
        }
    }

    fn from_f64(x: f64) -> Self {
        if x.is_finite() && x >= 0.0 && x.fract() == 0.0 {
            // Saturating cast: whole floats past u64::MAX (18446744073709551617 parses as one)
            // become u64::MAX.
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a finite, non-negative whole number; `as` saturates past u64::MAX"
            )]
            let n = x as u64;
            Self::from_u64(n)
        } else {
            Self::Unusable
        }
    }
}

impl<'a> RequestFacts<'a> {
    /// The output cap the upstream honours for a call to `endpoint`, `None` when the call sets
    /// none it would honour (the model's ceiling applies). Chat Completions honours
    /// `max_completion_tokens`, else `max_tokens`; the Responses API `max_output_tokens`.
    /// A member of the other API is foreign to the upstream and ignored: it cannot lower the
    /// estimate of a call the upstream lets run to its real cap.
    #[must_use]
    pub fn output_cap(&self, endpoint: Endpoint) -> Option<u64> {
        let honoured = match endpoint {
            Endpoint::ChatCompletions => match self.max_completion_tokens {
                Cap::Absent => self.max_tokens,
                cap => cap,
            },
            Endpoint::CreateResponse => self.max_output_tokens,
            _ => Cap::Absent,
        };
        match honoured {
            Cap::Tokens(n) => Some(n),
            Cap::Absent | Cap::Unusable => None,
        }
    }

    /// Parses and fully validates `body` as a JSON object.
    ///
    /// # Errors
    /// The parser's message (with line and column) when the body is not one JSON object.
    pub fn parse(body: &'a [u8]) -> Result<Self, String> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err("the body is empty; send a JSON object".to_owned());
        }
        // JSON is UTF-8; serde_json does not check strings it skips, so check the whole body.
        let text = std::str::from_utf8(body)
            .map_err(|e| format!("the body is not valid UTF-8 (at byte {})", e.valid_up_to()))?;
        let mut de = serde_json::Deserializer::from_str(text);
        let facts = de::Deserialize::deserialize(&mut de).map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())?;
        Ok(facts)
    }
}

impl<'de: 'a, 'a> de::Deserialize<'de> for RequestFacts<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(FactsVisitor(std::marker::PhantomData))
    }
}

struct FactsVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for FactsVisitor<'a> {
    type Value = RequestFacts<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut facts = RequestFacts::default();
        while let Some(Name(key)) = map.next_key::<Name<'de>>()? {
            match &*key {
                "model" => facts.model = map.next_value::<Lenient<Cow<'de, str>>>()?.0,
                "stream" => facts.stream = map.next_value::<Lenient<bool>>()?.0 == Some(true),
                "background" => {
                    facts.background = map.next_value::<Lenient<bool>>()?.0 == Some(true);
                }
                "previous_response_id" => {
                    facts.previous_response_id = map.next_value::<Lenient<Cow<'de, str>>>()?.0;
                }
                "stream_options" => {
                    facts.has_stream_options = true;
                    facts.include_usage = map.next_value::<StreamOptions>()?.0;
                }
                // A member given twice counts as the upstream reads it: the last one.
                "max_tokens" => facts.max_tokens = map.next_value()?,
                "max_completion_tokens" => facts.max_completion_tokens = map.next_value()?,
                "max_output_tokens" => facts.max_output_tokens = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(facts)
    }
}

/// A member name, borrowed from the body unless it holds escapes. (serde's own
/// `Deserialize` for `Cow<str>` always copies: a string allocated per top-level member.)
struct Name<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// Visitor methods that accept (and fully consume) every other JSON type as `None`.
macro_rules! lenient_others {
    () => {
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(Lenient(None))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(Lenient(None))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Lenient(None))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Lenient(None))
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Lenient(None))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(Lenient(None))
        }
    };
}

/// A value of type `T` when the JSON has that type, `None` for any other (still validated).
struct Lenient<T>(Option<T>);

impl<'de> de::Deserialize<'de> for Lenient<Cow<'de, str>> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Lenient<Cow<'de, str>>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Lenient(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Lenient(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            lenient_others!();
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> de::Deserialize<'de> for Lenient<bool> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Lenient<bool>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Lenient(Some(v)))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            lenient_others!();
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> de::Deserialize<'de> for Cap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Cap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Cap::from_u64(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(u64::try_from(v).map_or(Cap::Unusable, Cap::from_u64))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Cap::from_f64(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cap::from_text(v))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Cap::Unusable)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Cap::Absent)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Cap::Unusable)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Cap::Unusable)
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// `stream_options`: whether `include_usage` is `true` (any other shape counts as not asked).
struct StreamOptions(bool);

impl<'de> de::Deserialize<'de> for StreamOptions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StreamOptions;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut include = false;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "include_usage" {
                        include = map.next_value::<Lenient<bool>>()?.0 == Some(true);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(StreamOptions(include))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(StreamOptions(false))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(StreamOptions(false))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(StreamOptions(false))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(StreamOptions(false))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(StreamOptions(false))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(StreamOptions(false))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(StreamOptions(false))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// The body to send upstream for a streamed chat call whose client did not ask for usage:
/// the client's bytes with `include_usage: true` spliced in, nothing else re-serialized (a
/// re-serialization would round numbers such as `"seed": 18446744073709551617`, reorder
/// members and rewrite escapes). See [`include_usage_edit`] for where the bytes go.
///
/// # Errors
/// Only if the body is not a JSON object (callers have already validated it).
pub fn with_include_usage(body: &[u8], facts: &RequestFacts<'_>) -> Result<bytes::Bytes, String> {
    let edit = if facts.has_stream_options {
        include_usage_edit(body)?
    } else {
        // No member to find: the closing brace is the body's last non-blank byte, and no
        // scan of the body is needed.
        let close = body
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .filter(|&i| body[i] == b'}')
            .ok_or_else(|| "not a JSON object".to_owned())?;
        let open = body
            .iter()
            .position(|&b| b == b'{')
            .ok_or_else(|| "not a JSON object".to_owned())?;
        let empty = body
            .get(open + 1..close)
            .is_none_or(|inside| inside.iter().all(u8::is_ascii_whitespace));
        Edit {
            start: close,
            end: close,
            insert: if empty {
                STREAM_OPTIONS
            } else {
                COMMA_STREAM_OPTIONS
            },
        }
    };
    Ok(edit.apply(body).into())
}

const STREAM_OPTIONS: &str = r#""stream_options":{"include_usage":true}"#;
const COMMA_STREAM_OPTIONS: &str = r#","stream_options":{"include_usage":true}"#;
const INCLUDE_USAGE: &str = r#""include_usage":true"#;
const COMMA_INCLUDE_USAGE: &str = r#","include_usage":true"#;
const USAGE_OBJECT: &str = r#"{"include_usage":true}"#;

/// One splice: `body[start..end]` is replaced by `insert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edit {
    /// First byte replaced (or where `insert` goes when `start == end`).
    pub start: usize,
    /// End of the bytes replaced (exclusive).
    pub end: usize,
    /// What goes in their place.
    pub insert: &'static str,
}

impl Edit {
    /// `body` with the splice made.
    #[must_use]
    pub fn apply(&self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() - (self.end - self.start) + self.insert.len());
        out.extend_from_slice(&body[..self.start]);
        out.extend_from_slice(self.insert.as_bytes());
        out.extend_from_slice(&body[self.end..]);
        out
    }
}

/// Where `include_usage: true` goes in `body`, a validated JSON object, so that the upstream
/// (which, like `serde_json`, takes the last of duplicate members) reads it:
/// - no top-level `stream_options`: `"stream_options":{"include_usage":true}` is added before
///   the closing brace;
/// - the last `stream_options` is an object: its last `include_usage` value becomes `true`, or,
///   when it has none, `"include_usage":true` is added before its closing brace;
/// - the last `stream_options` is anything else (`null`, a number, ...): that value becomes
///   `{"include_usage":true}`.
///
/// # Errors
/// When the body is not a JSON object (callers validate it first).
pub fn include_usage_edit(body: &[u8]) -> Result<Edit, String> {
    let mut scan = Scan { b: body, i: 0 };
    let top = scan.object("stream_options")?;
    let Some((start, end)) = top.last else {
        return Ok(Edit {
            start: top.close,
            end: top.close,
            insert: if top.empty {
                STREAM_OPTIONS
            } else {
                COMMA_STREAM_OPTIONS
            },
        });
    };
    if body[start] != b'{' {
        return Ok(Edit {
            start,
            end,
            insert: USAGE_OBJECT,
        });
    }
    let options = Scan { b: body, i: start }.object("include_usage")?;
    Ok(match options.last {
        Some((start, end)) => Edit {
            start,
            end,
            insert: "true",
        },
        None => Edit {
            start: options.close,
            end: options.close,
            insert: if options.empty {
                INCLUDE_USAGE
            } else {
                COMMA_INCLUDE_USAGE
            },
        },
    })
}

/// A cursor over a body that already passed the JSON parser: it only finds where members
/// and values are. Iterative (any nesting depth, no recursion), and every step is bounded by
/// the body's length; a malformed body is an error, never a panic.
struct Scan<'b> {
    b: &'b [u8],
    i: usize,
}

/// What [`Scan::object`] found in one object.
struct Members {
    /// Span of the value of the last member with the name asked for.
    last: Option<(usize, usize)>,
    /// Index of the object's closing brace.
    close: usize,
    /// Whether the object has no members.
    empty: bool,
}

impl Scan<'_> {
    fn malformed() -> String {
        "not a JSON object".to_owned()
    }

    fn blanks(&mut self) {
        while self
            .b
            .get(self.i)
            .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        {
            self.i += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), String> {
        self.blanks();
        if self.b.get(self.i) == Some(&byte) {
            self.i += 1;
            Ok(())
        } else {
            Err(Self::malformed())
        }
    }

    /// Skips a string starting at the cursor (its opening quote).
    fn string(&mut self) -> Result<(), String> {
        self.i += 1;
        loop {
            match self.b.get(self.i) {
                None => return Err(Self::malformed()),
                Some(b'\\') => self.i += 2,
                Some(b'"') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(_) => self.i += 1,
            }
        }
    }

    /// Skips one value after optional blanks; returns its span.
    fn value(&mut self) -> Result<(usize, usize), String> {
        self.blanks();
        let start = self.i;
        match self.b.get(self.i) {
            None => return Err(Self::malformed()),
            Some(b'"') => self.string()?,
            Some(b'{' | b'[') => {
                let mut depth = 0usize;
                loop {
                    match self.b.get(self.i) {
                        None => return Err(Self::malformed()),
                        Some(b'"') => self.string()?,
                        Some(b'{' | b'[') => {
                            depth += 1;
                            self.i += 1;
                        }
                        Some(b'}' | b']') => {
                            depth -= 1;
                            self.i += 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        Some(_) => self.i += 1,
                    }
                }
            }
            Some(_) => {
                while self.b.get(self.i).is_some_and(|b| {
                    !matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                }) {
                    self.i += 1;
                }
            }
        }
        if self.i == start || self.i > self.b.len() {
            return Err(Self::malformed());
        }
        Ok((start, self.i))
    }

    /// Reads the object starting at the cursor (after optional blanks), member by member.
    fn object(&mut self, name: &str) -> Result<Members, String> {
        self.expect(b'{')?;
        let mut found = Members {
            last: None,
            close: 0,
            empty: true,
        };
        loop {
            self.blanks();
            match self.b.get(self.i) {
                Some(b'}') if found.empty => break,
                Some(b'"') => {}
                _ => return Err(Self::malformed()),
            }
            let key_start = self.i;
            self.string()?;
            let key = &self.b[key_start..self.i];
            self.expect(b':')?;
            let span = self.value()?;
            if key_is(key, name) {
                found.last = Some(span);
            }
            found.empty = false;
            self.blanks();
            match self.b.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b'}') => break,
                _ => return Err(Self::malformed()),
            }
        }
        found.close = self.i;
        self.i += 1;
        Ok(found)
    }
}

/// Whether the quoted member name `key` (as in the body, escapes and all) is `name`.
fn key_is(key: &[u8], name: &str) -> bool {
    let raw = &key[1..key.len() - 1];
    if raw.contains(&b'\\') {
        serde_json::from_slice::<Cow<'_, str>>(key).is_ok_and(|k| k == name)
    } else {
        raw == name.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_and_stream() {
        let f = RequestFacts::parse(br#"{"messages":[{"role":"user","content":"hi"}],"model":"openai.gpt-oss-120b","stream":true}"#)
            .expect("valid");
        assert_eq!(f.model.as_deref(), Some("openai.gpt-oss-120b"));
        assert!(matches!(f.model, Some(Cow::Borrowed(_))));
        assert!(f.stream);
    }

    #[test]
    fn reads_stream_options_and_caps() {
        let f = RequestFacts::parse(
            br#"{"stream":true,"stream_options":{"include_usage":true},"max_tokens":50,"max_completion_tokens":20,"background":true}"#,
        )
        .expect("valid");
        assert!(f.has_stream_options && f.include_usage && f.background);
        assert_eq!(f.max_tokens, Cap::Tokens(50));
        assert_eq!(f.max_completion_tokens, Cap::Tokens(20));
        assert_eq!(f.max_output_tokens, Cap::Absent);
        let f = RequestFacts::parse(
            br#"{"stream_options":{"include_usage":false},"max_output_tokens":-1}"#,
        )
        .expect("valid");
        assert!(f.has_stream_options && !f.include_usage);
        assert_eq!(f.max_output_tokens, Cap::Unusable);
    }

    fn cap(body: &str, endpoint: Endpoint) -> Option<u64> {
        RequestFacts::parse(body.as_bytes())
            .expect("valid")
            .output_cap(endpoint)
    }

    #[test]
    fn the_cap_is_the_one_the_api_honours() {
        let chat = Endpoint::ChatCompletions;
        let responses = Endpoint::CreateResponse;
        // A member of the other API is ignored, however small.
        let decoy = r#"{"max_tokens":100000,"max_output_tokens":1}"#;
        assert_eq!(cap(decoy, chat), Some(100_000));
        assert_eq!(cap(decoy, responses), Some(1));
        assert_eq!(
            cap(r#"{"max_output_tokens":7,"max_tokens":1}"#, responses),
            Some(7)
        );
        assert_eq!(cap(r#"{"max_tokens":1}"#, responses), None);
        assert_eq!(cap(r#"{"max_output_tokens":1}"#, chat), None);
        // Chat: max_completion_tokens wins over max_tokens, either way round.
        assert_eq!(
            cap(r#"{"max_tokens":9,"max_completion_tokens":3}"#, chat),
            Some(3)
        );
        assert_eq!(
            cap(r#"{"max_completion_tokens":3,"max_tokens":9}"#, chat),
            Some(3)
        );
        // ...unless it is absent or null: then max_tokens.
        assert_eq!(
            cap(r#"{"max_completion_tokens":null,"max_tokens":9}"#, chat),
            Some(9)
        );
        // 0 is refused, or read as no cap at all: the ceiling, not the smaller max_tokens.
        assert_eq!(
            cap(r#"{"max_completion_tokens":0,"max_tokens":1}"#, chat),
            None
        );
        // A cap the upstream refuses is no cap: the ceiling applies.
        assert_eq!(
            cap(r#"{"max_completion_tokens":"x","max_tokens":1}"#, chat),
            None
        );
        // Nested members are not the call's cap.
        assert_eq!(
            cap(r#"{"metadata":{"max_tokens":1},"max_tokens":50}"#, chat),
            Some(50)
        );
        assert_eq!(cap(r#"{"metadata":{"max_tokens":1}}"#, chat), None);
        // Other endpoints generate nothing.
        assert_eq!(cap(r#"{"max_tokens":5}"#, Endpoint::CountInputTokens), None);
    }

    #[test]
    fn the_last_of_duplicate_members_counts_as_the_upstream_reads_it() {
        let chat = Endpoint::ChatCompletions;
        let body = r#"{"max_completion_tokens":1,"max_completion_tokens":100000}"#;
        assert_eq!(cap(body, chat), Some(100_000));
        // serde_json's own reading of the same body agrees.
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["max_completion_tokens"], 100_000);
        assert_eq!(
            cap(r#"{"max_tokens":100000,"max_tokens":1}"#, chat),
            Some(1)
        );
        assert_eq!(cap(r#"{"max_tokens":5,"max_tokens":null}"#, chat), None);
        let body = br#"{"stream_options":{"include_usage":true},"stream_options":null}"#;
        let f = RequestFacts::parse(body).expect("valid");
        assert!(f.has_stream_options && !f.include_usage);
        let body = br#"{"stream_options":{"include_usage":true,"include_usage":false}}"#;
        assert!(!RequestFacts::parse(body).expect("valid").include_usage);
    }

    #[test]
    fn caps_are_read_as_lenient_parsers_read_them() {
        let chat = Endpoint::ChatCompletions;
        for (value, expected) in [
            ("100", Some(100)),
            ("100.0", Some(100)),
            ("1e5", Some(100_000)),
            (r#""2048""#, Some(2048)),
            (r#"" 64 ""#, Some(64)),
            ("18446744073709551615", Some(u64::MAX)),
            // Past u64: parsed as a float, saturated.
            ("18446744073709551617", Some(u64::MAX)),
            (r#""99999999999999999999999""#, Some(u64::MAX)),
            ("1e300", Some(u64::MAX)),
            ("-1", None),
            ("-0.0", None),
            ("0", None),
            ("1.5", None),
            ("true", None),
            (r#""12a""#, None),
            (r#""""#, None),
            ("[100]", None),
            (r#"{"n":100}"#, None),
            ("null", None),
        ] {
            assert_eq!(
                cap(&format!(r#"{{"max_tokens":{value}}}"#), chat),
                expected,
                "{value}"
            );
        }
        // Out of a double's range: not JSON serde_json reads; refused, never a panic.
        assert!(RequestFacts::parse(br#"{"max_tokens":1e400}"#).is_err());
    }

    fn spliced(body: &str) -> String {
        let facts = RequestFacts::parse(body.as_bytes()).expect("valid");
        let out = with_include_usage(body.as_bytes(), &facts).expect("spliced");
        String::from_utf8(out.to_vec()).expect("utf8")
    }

    #[test]
    fn include_usage_is_spliced_without_reserializing() {
        for (body, expected) in [
            (
                r#"  { "model" : "m",  "stream":true }"#,
                r#"  { "model" : "m",  "stream":true ,"stream_options":{"include_usage":true}}"#,
            ),
            ("{}\n", "{\"stream_options\":{\"include_usage\":true}}\n"),
            (
                r#"{"seed": 18446744073709551617, "t": 1e400, "z": -0.0, "s": "\u00e9\ud83d\ude00"}"#,
                r#"{"seed": 18446744073709551617, "t": 1e400, "z": -0.0, "s": "\u00e9\ud83d\ude00","stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"stream_options":{"include_obfuscation":false},"seed":18446744073709551617}"#,
                r#"{"stream_options":{"include_obfuscation":false,"include_usage":true},"seed":18446744073709551617}"#,
            ),
            (
                r#"{"stream_options" : { } ,"n":1}"#,
                r#"{"stream_options" : { "include_usage":true} ,"n":1}"#,
            ),
            (
                r#"{"stream_options":{"include_usage": false , "x":1}}"#,
                r#"{"stream_options":{"include_usage": true , "x":1}}"#,
            ),
            (
                r#"{"stream_options":null,"n":1}"#,
                r#"{"stream_options":{"include_usage":true},"n":1}"#,
            ),
            (
                r#"{"stream_options":"yes"}"#,
                r#"{"stream_options":{"include_usage":true}}"#,
            ),
            // Duplicates: the last one is the upstream's, so the last one is changed.
            (
                r#"{"stream_options":{"include_usage":true},"stream_options":{"a":"}"}}"#,
                r#"{"stream_options":{"include_usage":true},"stream_options":{"a":"}","include_usage":true}}"#,
            ),
            (
                r#"{"stream_options":{"include_usage":false,"include_usage":false}}"#,
                r#"{"stream_options":{"include_usage":false,"include_usage":true}}"#,
            ),
            // Escaped names are the same names.
            (
                r#"{"stream\u005foptions":{"include\u005fusage":false}}"#,
                r#"{"stream\u005foptions":{"include\u005fusage":true}}"#,
            ),
            // Nested look-alikes are not the member.
            (
                r#"{"metadata":{"stream_options":null},"stream_options":[{"include_usage":false}]}"#,
                r#"{"metadata":{"stream_options":null},"stream_options":{"include_usage":true}}"#,
            ),
        ] {
            assert_eq!(spliced(body), expected, "{body}");
            assert!(
                RequestFacts::parse(expected.as_bytes())
                    .expect("still valid")
                    .include_usage
            );
        }
    }

    #[test]
    fn splicing_survives_deep_nesting() {
        let deep = format!(
            r#"{{"a":{}1{},"stream_options":{{}}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        let out = spliced(&deep);
        assert!(out.ends_with(r#""stream_options":{"include_usage":true}}"#));
        assert_eq!(out.len(), deep.len() + r#""include_usage":true"#.len());
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        for body in [
            &b""[..],
            b"{",
            b"{\"a\"",
            b"{\"a\":",
            b"{\"a\":\"\\",
            b"{\"a\":[1,",
            b"{\"a\":1,\"stream_options\":{",
            b"[1]",
            b"}",
            b"{\"a\":1 2}",
        ] {
            assert!(include_usage_edit(body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn odd_types_are_tolerated() {
        let f = RequestFacts::parse(br#"{"model":{"x":[1,2]},"stream":"yes"}"#).expect("valid");
        assert_eq!(f, RequestFacts::default());
        let f = RequestFacts::parse(br#"{"model":"a\"b"}"#).expect("escaped");
        assert_eq!(f.model.as_deref(), Some("a\"b"));
    }

    #[test]
    fn member_names_are_recognised_with_or_without_escapes() {
        // Names are borrowed from the body when they can be and copied when they hold escapes;
        // either way `stream` is `stream`.
        let plain =
            RequestFacts::parse(br#"{"model":"m","stream":true,"max_tokens":7}"#).expect("plain");
        let escaped =
            RequestFacts::parse(br#"{"mod\u0065l":"m","str\u0065am":true,"max\u005ftokens":7}"#)
                .expect("escaped");
        assert_eq!(plain, escaped);
        assert_eq!(plain.model.as_deref(), Some("m"));
        assert!(plain.stream);
        assert_eq!(plain.max_tokens, Cap::Tokens(7));
        // A name that is not a string is not JSON.
        assert!(RequestFacts::parse(b"{1:2}").is_err());
    }

    #[test]
    fn invalid_json_is_refused() {
        for body in [
            &b""[..],
            b"  ",
            b"{",
            b"[1,2]",
            b"\"model\"",
            b"{\"model\":\"x\"} trailing",
            b"{\"a\":1,}",
            b"{\"a\":\"\xff\"}",
        ] {
            assert!(
                RequestFacts::parse(body).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        let deep = "[".repeat(10_000);
        let body = format!("{{\"a\":{deep}");
        assert!(RequestFacts::parse(body.as_bytes()).is_err());
    }
}
