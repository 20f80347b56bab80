//! The values that go into the store and come out of it.

use std::fmt;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

/// A position in the global order of all messages. Positions grow in the order readers see
/// messages, but they are not dense: gaps are normal. `0` comes before every message.
pub type GlobalPosition = u64;

/// A message's place in its own stream: 0 for the first, then 1, 2, ... with no gaps.
pub type StreamPosition = u64;

/// The name of a stream, `category-id` (for example `user-0190f1...`). The category is everything
/// before the first `-`; a name without `-` is a category stream of its own.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(String);

impl StreamName {
    /// The longest stream name accepted; longer names are a programming error, not data.
    pub const MAX_LEN: usize = 300;

    pub fn parse(name: impl Into<String>) -> Result<Self, InvalidStreamName> {
        let name = name.into();
        let valid_category = name
            .split('-')
            .next()
            .is_some_and(|category| !category.is_empty());
        if !valid_category || name.len() > Self::MAX_LEN || name.chars().any(char::is_control) {
            return Err(InvalidStreamName(name));
        }
        Ok(Self(name))
    }

    /// The stream `category-id`.
    pub fn for_entity(category: &str, id: impl fmt::Display) -> Result<Self, InvalidStreamName> {
        Self::parse(format!("{category}-{id}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn category(&self) -> &str {
        self.0.split('-').next().unwrap_or(&self.0)
    }

    /// The part after the category, if any.
    pub fn id(&self) -> Option<&str> {
        self.0.split_once('-').map(|(_, id)| id)
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid stream name {0:?}: it must be `category-id`, a non-empty category, at most 300 characters"
)]
pub struct InvalidStreamName(pub String);

/// A message to append. Its id makes a retried append idempotent: choose it once, before the
/// first attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub id: Uuid,
    pub message_type: String,
    pub data: Value,
    pub metadata: Value,
}

impl NewMessage {
    pub fn new(message_type: impl Into<String>, data: Value) -> Self {
        Self {
            id: Uuid::now_v7(),
            message_type: message_type.into(),
            data,
            metadata: Value::Object(Default::default()),
        }
    }

    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    pub fn with_metadata(mut self, metadata: Value) -> Self {
        self.metadata = metadata;
        self
    }
}

/// What the writer believes about a stream before appending to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the stream holds.
    Any,
    /// The stream must not exist yet (it has no messages).
    NoStream,
    /// The stream's last message must be at this position.
    Exact(StreamPosition),
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no stream"),
            Self::Exact(position) => write!(f, "{position}"),
        }
    }
}

impl ExpectedVersion {
    /// The version a stream must have when its current version is `actual` (None: no stream).
    pub fn allows(self, actual: Option<StreamPosition>) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual.is_none(),
            Self::Exact(expected) => actual == Some(expected),
        }
    }
}

/// Messages for one stream within an append.
#[derive(Debug, Clone)]
pub struct StreamAppend {
    pub stream: StreamName,
    pub expected: ExpectedVersion,
    pub messages: Vec<NewMessage>,
}

impl StreamAppend {
    pub fn new(stream: StreamName, expected: ExpectedVersion, messages: Vec<NewMessage>) -> Self {
        Self {
            stream,
            expected,
            messages,
        }
    }
}

/// Where an appended message landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendedMessage {
    pub id: Uuid,
    pub stream: StreamName,
    pub position: StreamPosition,
    pub global_position: GlobalPosition,
}

/// The result of an append, in the order the messages were given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub messages: Vec<AppendedMessage>,
}

impl Appended {
    /// The global position of the last message written: what a reader must have reached to see
    /// all of this append.
    pub fn last_global_position(&self) -> GlobalPosition {
        self.messages
            .iter()
            .map(|message| message.global_position)
            .max()
            .unwrap_or(0)
    }
}

/// A stored message.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedMessage {
    pub id: Uuid,
    pub stream: StreamName,
    pub position: StreamPosition,
    pub global_position: GlobalPosition,
    pub message_type: String,
    pub data: Value,
    pub metadata: Value,
    pub time: DateTime<Utc>,
}
