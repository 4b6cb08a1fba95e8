//! The few facts the proxy needs from a request body, read in one validating pass.
//!
//! Hand-written visitor rather than `#[derive(Deserialize)]`: it insists on a JSON object
//! (derive also accepts arrays for structs), keeps borrowed strings, and is lenient about the
//! types of fields it only peeks at, leaving type errors to bedrock-mantle's own validation.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

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
    /// The output cap: `max_completion_tokens`, `max_tokens` or `max_output_tokens`.
    pub max_output_tokens: Option<u64>,
    /// `background`, when it is a boolean.
    pub background: bool,
    /// `previous_response_id`, when it is a string: a stored response the call builds on.
    pub previous_response_id: Option<Cow<'a, str>>,
}

impl<'a> RequestFacts<'a> {
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
                "max_completion_tokens" | "max_tokens" | "max_output_tokens" => {
                    if let Some(n) = map.next_value::<Lenient<u64>>()?.0 {
                        facts.max_output_tokens =
                            Some(facts.max_output_tokens.map_or(n, |m| m.min(n)));
                    }
                }
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

impl<'de> de::Deserialize<'de> for Lenient<u64> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Lenient<u64>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Lenient(Some(v)))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
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
/// the same bytes with `"stream_options":{"include_usage":true}` spliced in after the opening
/// brace. Only when the body already has a `stream_options` object is it re-serialized (the
/// one exception to byte-for-byte forwarding), with `include_usage` set.
///
/// # Errors
/// Only if the body is not a JSON object (callers have already validated it).
pub fn with_include_usage(body: &[u8], facts: &RequestFacts<'_>) -> Result<bytes::Bytes, String> {
    if !facts.has_stream_options {
        let open = body
            .iter()
            .position(|&b| b == b'{')
            .ok_or_else(|| "not a JSON object".to_owned())?;
        let rest = &body[open + 1..];
        let empty = rest.iter().all(|b| b.is_ascii_whitespace() || *b == b'}');
        let mut out = Vec::with_capacity(body.len() + 40);
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(br#""stream_options":{"include_usage":true}"#);
        if !empty {
            out.push(b',');
        }
        out.extend_from_slice(rest);
        return Ok(out.into());
    }
    let mut value: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| "not a JSON object".to_owned())?;
    let options = object
        .entry("stream_options")
        .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
    if !options.is_object() {
        *options = serde_json::Value::Object(serde_json::Map::new());
    }
    if let Some(o) = options.as_object_mut() {
        o.insert("include_usage".to_owned(), serde_json::Value::Bool(true));
    }
    serde_json::to_vec(&value)
        .map(Into::into)
        .map_err(|e| e.to_string())
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
        assert_eq!(f.max_output_tokens, Some(20));
        let f = RequestFacts::parse(
            br#"{"stream_options":{"include_usage":false},"max_output_tokens":-1}"#,
        )
        .expect("valid");
        assert!(f.has_stream_options && !f.include_usage);
        assert_eq!(f.max_output_tokens, None);
    }

    #[test]
    fn include_usage_is_spliced_without_reserializing() {
        let body = br#"  { "model" : "m",  "stream":true }"#;
        let facts = RequestFacts::parse(body).expect("valid");
        let out = with_include_usage(body, &facts).expect("spliced");
        assert_eq!(
            std::str::from_utf8(&out).expect("utf8"),
            r#"  {"stream_options":{"include_usage":true}, "model" : "m",  "stream":true }"#
        );
        let again = RequestFacts::parse(&out).expect("still valid");
        assert!(again.include_usage && again.stream);

        let body = br#"{"stream":true,"stream_options":{"include_obfuscation":false}}"#;
        let facts = RequestFacts::parse(body).expect("valid");
        let out = with_include_usage(body, &facts).expect("rewritten");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["include_obfuscation"], false);
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
        assert_eq!(plain.max_output_tokens, Some(7));
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
