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
pub struct RequestFacts<'a> {
    /// `model`, when it is a string.
    pub model: Option<Cow<'a, str>>,
    /// `stream`, when it is a boolean.
    pub stream: bool,
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
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match &*key {
                "model" => facts.model = map.next_value::<Lenient<Cow<'de, str>>>()?.0,
                "stream" => facts.stream = map.next_value::<Lenient<bool>>()?.0 == Some(true),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(facts)
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
    fn odd_types_are_tolerated() {
        let f = RequestFacts::parse(br#"{"model":{"x":[1,2]},"stream":"yes"}"#).expect("valid");
        assert_eq!(f, RequestFacts::default());
        let f = RequestFacts::parse(br#"{"model":"a\"b"}"#).expect("escaped");
        assert_eq!(f.model.as_deref(), Some("a\"b"));
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
