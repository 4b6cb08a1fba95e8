//! `Secret<T>`: a value that never shows itself in Debug output, logs or serialized data.

use std::fmt;

/// Wraps a secret (an API key, a token) so that `{:?}` prints `*****` and nothing can serialize it.
/// Read it only where it is sent, with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret itself: call only where it leaves the process (an outgoing header).
    pub fn expose(&self) -> &T {
        &self.0
    }
}

/// Read from the config as the plain value; from then on it only shows as `*****`.
impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Secret<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Self)
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn debug_hides_the_value() {
        let s = Secret::new("bedrock-api-key-abc".to_owned());
        assert_eq!(format!("{s:?}"), "*****");
        assert_eq!(format!("{:?}", Some(&s)), "Some(*****)");
        assert_eq!(s.expose(), "bedrock-api-key-abc");
    }
}
