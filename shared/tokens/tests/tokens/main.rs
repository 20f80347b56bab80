//! Behaviour of the tokens crate through its public API, with real keys and real signatures.

// The helpers outside `#[test]` functions unwrap too: in a test binary a failed unwrap is a
// failed test, with the error in its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod key_file;
mod keys;
mod redaction;
mod refusals;
mod rotation;
mod round_trip;
mod support;
