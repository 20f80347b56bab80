//! Golden fixtures: every event version ever written must still be read by this build.
//!
//! `fixtures/<EventType>.v<version>.json` holds the stored data of one example event. Add one
//! for each new event type and each new version, and never edit or delete an old one: they are
//! what production stores hold.

// The helpers below are test code too: a missing or unreadable fixture should fail loudly.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use identity::{
    AdministratorsEvent, EventDecodeError, LoginEvent, RecoveryEvent, SessionEvent, UserEvent,
    WebhookEvent,
};
use serde_json::Value;

struct Fixture {
    file: String,
    event_type: String,
    version: u32,
    data: Value,
}

#[derive(Debug)]
enum Decoded {
    User(UserEvent),
    Login(LoginEvent),
    Administrators(AdministratorsEvent),
    Session(SessionEvent),
    // Boxed: its every event carries the whole recovery state, and is much larger than the others.
    Recovery(Box<RecoveryEvent>),
    Webhook(WebhookEvent),
}

impl Decoded {
    fn event_type(&self) -> &'static str {
        match self {
            Self::User(event) => event.event_type(),
            Self::Login(event) => event.event_type(),
            Self::Administrators(event) => event.event_type(),
            Self::Session(event) => event.event_type(),
            Self::Recovery(event) => event.event_type(),
            Self::Webhook(event) => event.event_type(),
        }
    }

    fn version(&self) -> u32 {
        match self {
            Self::User(event) => event.version(),
            Self::Login(event) => event.version(),
            Self::Administrators(event) => event.version(),
            Self::Session(event) => event.version(),
            Self::Recovery(event) => event.version(),
            Self::Webhook(event) => event.version(),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Self::User(event) => event.to_json(),
            Self::Login(event) => event.to_json(),
            Self::Administrators(event) => event.to_json(),
            Self::Session(event) => event.to_json(),
            Self::Recovery(event) => event.to_json(),
            Self::Webhook(event) => event.to_json(),
        }
    }
}

fn fixtures() -> Vec<Fixture> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut fixtures: Vec<Fixture> = fs::read_dir(&dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let (event_type, version) = file
                .strip_suffix(".json")
                .and_then(|stem| stem.rsplit_once(".v"))
                .unwrap_or_else(|| panic!("{file}: name it <EventType>.v<version>.json"));
            let version = version
                .parse()
                .unwrap_or_else(|_| panic!("{file}: the version is not a number"));
            let data = serde_json::from_str(&fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|error| panic!("{file}: not JSON: {error}"));
            Fixture {
                event_type: event_type.to_owned(),
                version,
                data,
                file,
            }
        })
        .collect();
    fixtures.sort_by(|a, b| a.file.cmp(&b.file));
    assert!(!fixtures.is_empty(), "no fixtures in {}", dir.display());
    fixtures
}

fn decode(fixture: &Fixture) -> Result<Decoded, EventDecodeError> {
    let (event_type, version, data) = (&fixture.event_type, fixture.version, &fixture.data);
    let unknown =
        |result: &Result<_, _>| matches!(result, Err(EventDecodeError::UnknownType { .. }));
    let user = UserEvent::from_stored(event_type, version, data).map(Decoded::User);
    if !unknown(&user) {
        return user;
    }
    let login = LoginEvent::from_stored(event_type, version, data).map(Decoded::Login);
    if !unknown(&login) {
        return login;
    }
    let administrators =
        AdministratorsEvent::from_stored(event_type, version, data).map(Decoded::Administrators);
    if !unknown(&administrators) {
        return administrators;
    }
    let session = SessionEvent::from_stored(event_type, version, data).map(Decoded::Session);
    if !unknown(&session) {
        return session;
    }
    let recovery = RecoveryEvent::from_stored(event_type, version, data)
        .map(|event| Decoded::Recovery(Box::new(event)));
    if !unknown(&recovery) {
        return recovery;
    }
    WebhookEvent::from_stored(event_type, version, data).map(Decoded::Webhook)
}

#[test]
fn every_fixture_still_decodes_and_the_current_versions_re_encode_unchanged() {
    for fixture in fixtures() {
        let event = decode(&fixture).unwrap_or_else(|error| panic!("{}: {error}", fixture.file));
        assert_eq!(event.event_type(), fixture.event_type, "{}", fixture.file);
        if event.version() == fixture.version {
            assert_eq!(event.to_json(), fixture.data, "{}", fixture.file);
        }
    }
}

#[test]
fn every_event_type_has_a_fixture_of_its_current_version() {
    let covered: BTreeSet<&'static str> = fixtures()
        .iter()
        .filter_map(|fixture| decode(fixture).ok().map(|event| (fixture.version, event)))
        .filter(|(version, event)| event.version() == *version)
        .map(|(_, event)| event.event_type())
        .collect();
    let every_type = UserEvent::TYPES
        .iter()
        .chain(LoginEvent::TYPES)
        .chain(AdministratorsEvent::TYPES)
        .chain(SessionEvent::TYPES)
        .chain(RecoveryEvent::TYPES)
        .chain(WebhookEvent::TYPES);
    for event_type in every_type {
        assert!(
            covered.contains(event_type),
            "{event_type} has no fixture of its current version in tests/fixtures/"
        );
    }
}

#[test]
fn a_fixture_read_through_the_wrong_stream_is_an_unknown_type() {
    let login = fixtures()
        .into_iter()
        .find(|fixture| fixture.event_type == "LoginSucceeded")
        .unwrap();
    assert!(matches!(
        UserEvent::from_stored(&login.event_type, login.version, &login.data),
        Err(EventDecodeError::UnknownType { .. })
    ));
}
