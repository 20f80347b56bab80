//! A wrapper that keeps tokens and private keys out of logs and wipes them from memory.

use std::fmt;

use serde::{Deserialize, Deserializer};
use zeroize::Zeroize;

/// A value that must never reach a log (design decision 11): `Debug` prints `[redacted]`, there
/// is no `Display` and no `Serialize`, and the memory is zeroed when the value is dropped.
///
/// Reading it takes a deliberate [`Secret::expose_secret`], which is easy to find in review.
/// It implements `Deserialize` so configuration (a PEM in an environment variable) can be read
/// straight into it.
pub struct Secret<T: Zeroize>(T);

impl<T: Zeroize> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The value itself, for the one place that has to send or parse it.
    pub fn expose_secret(&self) -> &T {
        &self.0
    }
}

impl<T: Zeroize> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Secret(value)
    }
}

impl<T: Zeroize + Clone> Clone for Secret<T> {
    fn clone(&self) -> Self {
        Secret(self.0.clone())
    }
}

impl<T: Zeroize> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T: Zeroize> Drop for Secret<T> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<'de, T: Zeroize + Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_redacted_and_never_the_value() {
        let secret = Secret::new(String::from("hunter2"));
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&secret)), "Some([redacted])");
        assert_eq!(secret.expose_secret(), "hunter2");
    }

    #[test]
    fn a_secret_can_be_read_from_configuration() {
        let secret: Secret<String> = serde_json::from_str("\"pem text\"").unwrap();
        assert_eq!(secret.expose_secret(), "pem text");
    }
}
