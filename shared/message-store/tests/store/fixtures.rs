//! What the store tests write: streams of their own, numbered messages, and appends of them.

use message_store::{ExpectedVersion, NewMessage, StreamAppend, StreamName};
use serde_json::json;
use uuid::Uuid;

/// A stream of `category` that no other test writes to.
pub fn stream(category: &str) -> StreamName {
    StreamName::for_entity(category, Uuid::new_v4()).unwrap()
}

/// The message numbered `n`: its data is `{"n": n}`.
pub fn message(n: u64) -> NewMessage {
    NewMessage::new("Something", json!({ "n": n })).with_metadata(json!({ "by": "test" }))
}

/// An append of `messages` to one stream.
pub fn to_stream(
    stream: &StreamName,
    expected: ExpectedVersion,
    messages: Vec<NewMessage>,
) -> Vec<StreamAppend> {
    vec![StreamAppend::new(stream.clone(), expected, messages)]
}

/// An append of messages 0 to `count - 1` to one stream.
pub fn append(stream: &StreamName, expected: ExpectedVersion, count: u64) -> Vec<StreamAppend> {
    to_stream(stream, expected, (0..count).map(message).collect())
}

/// One message to a new stream: what a test appends when only whether it is written matters.
pub fn one_message() -> Vec<StreamAppend> {
    append(&stream("thing"), ExpectedVersion::NoStream, 1)
}
