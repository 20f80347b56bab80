//! The conformance suite: what every adapter of the message store must do, written once.

use std::time::Duration;

use message_store::{
    AppendError, Appended, ExpectedVersion, MessageStore, NewMessage, RecordedMessage,
    RenameStreamError, StreamAppend, StreamName, StreamPosition, Wake,
};
use serde_json::json;

use crate::fixtures::{append, message, stream, to_stream};
use crate::harness::{Harness, Postgres};

/// Appends messages 0 to `count - 1` to `stream`, which must succeed.
async fn write(
    store: &dyn MessageStore,
    stream: &StreamName,
    expected: ExpectedVersion,
    count: u64,
) -> Appended {
    store.append(append(stream, expected, count)).await.unwrap()
}

/// What an append refused for a version conflict names: the stream, the version the append
/// expected and the stream's actual one.
fn conflict(
    outcome: Result<Appended, AppendError>,
) -> (StreamName, ExpectedVersion, Option<StreamPosition>) {
    match outcome {
        Err(AppendError::WrongExpectedVersion {
            stream,
            expected,
            actual,
        }) => (stream, expected, actual),
        other => panic!("expected a version conflict, got {other:?}"),
    }
}

/// Appends, then waits until global readers can see the append. On PostgreSQL they see a
/// commit only once every transaction that started before it has ended (docs/adr/0002), and
/// other tests run transactions on the same server meanwhile.
async fn append_settled(store: &dyn MessageStore, appends: Vec<StreamAppend>) -> Appended {
    let appended = store.append(appends).await.unwrap();
    let target = appended.last_global_position();
    tokio::time::timeout(Duration::from_secs(10), async {
        while store.head_position().await.unwrap() < target {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("an append never became visible to global readers");
    appended
}

/// Appends messages 0 to `count - 1` to `stream` (see [`write`]), then waits until global
/// readers can see them (see [`append_settled`]).
async fn write_settled(
    store: &dyn MessageStore,
    stream: &StreamName,
    expected: ExpectedVersion,
    count: u64,
) -> Appended {
    append_settled(store, append(stream, expected, count)).await
}

async fn all(store: &dyn MessageStore) -> Vec<RecordedMessage> {
    store.read_all(0, 100_000).await.unwrap()
}

pub async fn the_first_message_of_a_stream_is_at_position_zero(harness: &dyn Harness) {
    let store = harness.store();
    let name = stream("thing");
    let appended = write(store.as_ref(), &name, ExpectedVersion::NoStream, 3).await;

    let positions: Vec<_> = appended.messages.iter().map(|m| m.position).collect();
    assert_eq!(positions, vec![0, 1, 2]);
    let globals: Vec<_> = appended
        .messages
        .iter()
        .map(|m| m.global_position)
        .collect();
    assert!(globals.windows(2).all(|pair| pair[0] < pair[1]));
    assert_eq!(appended.last_global_position(), globals[2]);

    let stored = store.read_stream(&name, 0, 10).await.unwrap();
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[0].message_type, "Something");
    assert_eq!(stored[0].data, json!({ "n": 0 }));
    assert_eq!(stored[0].metadata, json!({ "by": "test" }));
    assert_eq!(stored[0].stream, name);
    assert_eq!(stored[2].global_position, globals[2]);
}

pub async fn appending_with_no_stream_to_an_existing_stream_is_a_conflict_naming_the_actual_version(
    harness: &dyn Harness,
) {
    let store = harness.store();
    let name = stream("thing");
    write(store.as_ref(), &name, ExpectedVersion::NoStream, 2).await;

    let refused = store
        .append(append(&name, ExpectedVersion::NoStream, 1))
        .await;

    assert_eq!(
        conflict(refused),
        (name.clone(), ExpectedVersion::NoStream, Some(1))
    );
    assert_eq!(store.read_stream(&name, 0, 10).await.unwrap().len(), 2);
}

pub async fn appending_with_a_stale_exact_version_is_a_conflict(harness: &dyn Harness) {
    let store = harness.store();
    let name = stream("thing");
    write(store.as_ref(), &name, ExpectedVersion::NoStream, 3).await;

    let refused = store
        .append(append(&name, ExpectedVersion::Exact(1), 1))
        .await;
    assert_eq!(
        conflict(refused),
        (name.clone(), ExpectedVersion::Exact(1), Some(2))
    );

    let missing = stream("thing");
    let refused = store
        .append(append(&missing, ExpectedVersion::Exact(0), 1))
        .await;
    assert_eq!(
        conflict(refused),
        (missing.clone(), ExpectedVersion::Exact(0), None)
    );
    assert!(store.read_stream(&missing, 0, 10).await.unwrap().is_empty());
}

pub async fn appending_with_the_current_exact_version_succeeds(harness: &dyn Harness) {
    let store = harness.store();
    let name = stream("thing");
    write(store.as_ref(), &name, ExpectedVersion::NoStream, 2).await;

    let appended = write(store.as_ref(), &name, ExpectedVersion::Exact(1), 2).await;

    let positions: Vec<_> = appended.messages.iter().map(|m| m.position).collect();
    assert_eq!(positions, vec![2, 3]);
}

pub async fn appending_with_any_version_always_succeeds(harness: &dyn Harness) {
    let store = harness.store();
    let name = stream("thing");
    write(store.as_ref(), &name, ExpectedVersion::Any, 1).await;
    let appended = write(store.as_ref(), &name, ExpectedVersion::Any, 1).await;
    assert_eq!(appended.messages[0].position, 1);
}

pub async fn repeating_an_append_with_the_same_ids_writes_nothing_twice(harness: &dyn Harness) {
    let store = harness.store();
    let name = stream("thing");
    let request = append(&name, ExpectedVersion::NoStream, 2);

    let first = append_settled(store.as_ref(), request.clone()).await;
    // The retry still says "no stream": a retried request must succeed all the same.
    let second = append_settled(store.as_ref(), request).await;

    assert_eq!(first, second);
    assert_eq!(store.read_stream(&name, 0, 10).await.unwrap().len(), 2);
    assert_eq!(all(store.as_ref()).await.len(), 2);
}

pub async fn reusing_a_message_id_for_other_content_is_refused(harness: &dyn Harness) {
    let store = harness.store();
    let name = stream("thing");
    let original = message(1);
    let any = ExpectedVersion::Any;
    append_settled(
        store.as_ref(),
        to_stream(&name, any, vec![original.clone()]),
    )
    .await;

    let other_data = NewMessage::new("Something", json!({ "n": 2 })).with_id(original.id);
    let reuses = [
        ("other data", to_stream(&name, any, vec![other_data])),
        (
            "another stream",
            to_stream(&stream("thing"), any, vec![original.clone()]),
        ),
        // An append mixing a stored id with new ones is not a retry of anything.
        (
            "a stored id among new ones",
            to_stream(&name, any, vec![original.clone(), message(3)]),
        ),
    ];
    for (reuse, appends) in reuses {
        let refused = store.append(appends).await;
        assert!(
            matches!(refused, Err(AppendError::DuplicateMessageId { id }) if id == original.id),
            "{reuse}: {refused:?}"
        );
    }

    assert_eq!(all(store.as_ref()).await.len(), 1);
}

pub async fn an_append_to_several_streams_is_all_or_nothing(harness: &dyn Harness) {
    let store = harness.store();
    let fresh = stream("thing");
    let taken = stream("other");
    write_settled(store.as_ref(), &taken, ExpectedVersion::Any, 1).await;

    let error = store
        .append(vec![
            StreamAppend::new(fresh.clone(), ExpectedVersion::NoStream, vec![message(1)]),
            StreamAppend::new(taken.clone(), ExpectedVersion::NoStream, vec![message(2)]),
        ])
        .await
        .unwrap_err();

    assert!(
        matches!(&error, AppendError::WrongExpectedVersion { stream, .. } if *stream == taken),
        "{error:?}"
    );
    assert!(store.read_stream(&fresh, 0, 10).await.unwrap().is_empty());
    assert_eq!(all(store.as_ref()).await.len(), 1);
}

pub async fn an_append_to_several_streams_writes_them_all(harness: &dyn Harness) {
    let store = harness.store();
    let first = stream("thing");
    let second = stream("other");

    let appended = append_settled(
        store.as_ref(),
        vec![
            StreamAppend::new(
                first.clone(),
                ExpectedVersion::NoStream,
                vec![message(1), message(2)],
            ),
            StreamAppend::new(second.clone(), ExpectedVersion::NoStream, vec![message(3)]),
        ],
    )
    .await;

    let placed: Vec<_> = appended
        .messages
        .iter()
        .map(|m| (m.stream.clone(), m.position))
        .collect();
    assert_eq!(
        placed,
        vec![(first.clone(), 0), (first.clone(), 1), (second.clone(), 0)]
    );
    let stored: Vec<_> = all(store.as_ref())
        .await
        .into_iter()
        .map(|m| m.stream)
        .collect();
    assert_eq!(stored, vec![first.clone(), first, second]);
}

pub async fn a_stream_is_read_forward_in_batches(harness: &dyn Harness) {
    let store = harness.store();
    let name = stream("thing");
    let other = stream("thing");
    write(store.as_ref(), &name, ExpectedVersion::NoStream, 7).await;
    write(store.as_ref(), &other, ExpectedVersion::NoStream, 3).await;

    let mut read = Vec::new();
    let mut from = 0;
    loop {
        let batch = store.read_stream(&name, from, 3).await.unwrap();
        if batch.is_empty() {
            break;
        }
        assert!(batch.len() <= 3);
        from = batch.last().unwrap().position + 1;
        read.extend(batch);
    }
    let positions: Vec<_> = read.iter().map(|m| m.position).collect();
    assert_eq!(positions, (0..7).collect::<Vec<_>>());
    assert!(read.iter().all(|m| m.stream == name));
    assert_eq!(store.read_stream(&name, 5, 100).await.unwrap().len(), 2);
}

pub async fn the_last_message_of_a_stream_is_found(harness: &dyn Harness) {
    let store = harness.store();
    let name = stream("thing");
    assert!(store.last_message(&name).await.unwrap().is_none());
    write(store.as_ref(), &name, ExpectedVersion::NoStream, 4).await;

    let last = store.last_message(&name).await.unwrap().unwrap();
    assert_eq!(last.position, 3);
    assert_eq!(last.data, json!({ "n": 3 }));
}

pub async fn all_messages_are_read_in_batches_in_global_order(harness: &dyn Harness) {
    let store = harness.store();
    let mut written = Vec::new();
    for _ in 0..5 {
        let thing = stream("thing");
        let appended = write_settled(store.as_ref(), &thing, ExpectedVersion::NoStream, 3).await;
        written.extend(appended.messages.into_iter().map(|m| m.id));
    }

    let mut read = Vec::new();
    let mut after = 0;
    loop {
        let batch = store.read_all(after, 4).await.unwrap();
        if batch.is_empty() {
            break;
        }
        assert!(batch.len() <= 4);
        after = batch.last().unwrap().global_position;
        read.extend(batch);
    }
    assert!(
        read.windows(2)
            .all(|pair| pair[0].global_position < pair[1].global_position)
    );
    let ids: Vec<_> = read.iter().map(|m| m.id).collect();
    assert_eq!(ids, written);
}

pub async fn a_category_read_returns_only_that_category(harness: &dyn Harness) {
    let store = harness.store();
    let mut things = Vec::new();
    for n in 0..4 {
        let appended =
            write_settled(store.as_ref(), &stream("thing"), ExpectedVersion::Any, 1).await;
        things.push(appended.messages[0].id);
        for other in [format!("other{n}"), "thingamajig".to_owned()] {
            write_settled(store.as_ref(), &stream(&other), ExpectedVersion::Any, 1).await;
        }
    }

    let first = store.read_category("thing", 0, 3).await.unwrap();
    let rest = store
        .read_category("thing", first.last().unwrap().global_position, 3)
        .await
        .unwrap();
    let ids: Vec<_> = first.iter().chain(&rest).map(|m| m.id).collect();
    assert_eq!(ids, things);
    assert!(
        first
            .iter()
            .chain(&rest)
            .all(|m| m.stream.category() == "thing")
    );
}

pub async fn the_head_and_last_positions_and_backlog_follow_appends(harness: &dyn Harness) {
    let store = harness.store();
    assert_eq!(store.head_position().await.unwrap(), 0);
    assert_eq!(store.last_position().await.unwrap(), 0);
    assert_eq!(store.count_after(0).await.unwrap(), 0);

    let first = write_settled(store.as_ref(), &stream("thing"), ExpectedVersion::Any, 2).await;
    let second = write_settled(store.as_ref(), &stream("thing"), ExpectedVersion::Any, 3).await;

    assert_eq!(
        store.head_position().await.unwrap(),
        second.last_global_position()
    );
    assert_eq!(
        store.last_position().await.unwrap(),
        second.last_global_position()
    );
    assert_eq!(store.count_after(0).await.unwrap(), 5);
    assert_eq!(
        store
            .count_after(first.last_global_position())
            .await
            .unwrap(),
        3
    );
}

pub async fn invalid_appends_are_refused_before_writing(harness: &dyn Harness) {
    let store = harness.store();
    let name = stream("thing");
    let any = ExpectedVersion::Any;
    let twice = message(1);
    let invalid = [
        ("no message", append(&name, any, 0)),
        (
            "a message twice",
            to_stream(&name, any, vec![twice.clone(), twice]),
        ),
        (
            "a stream twice",
            vec![
                StreamAppend::new(name.clone(), any, vec![message(1)]),
                StreamAppend::new(name.clone(), any, vec![message(2)]),
            ],
        ),
        (
            "too many messages",
            append(
                &name,
                any,
                message_store::MAX_MESSAGES_PER_APPEND as u64 + 1,
            ),
        ),
    ];
    for (invalid, appends) in invalid {
        let refused = store.append(appends).await;
        assert!(
            matches!(refused, Err(AppendError::Invalid(_))),
            "{invalid}: {refused:?}"
        );
    }

    assert!(StreamName::parse("-no-category").is_err());
    assert!(StreamName::parse("").is_err());
    assert!(StreamName::parse("x".repeat(301)).is_err());
    assert!(all(store.as_ref()).await.is_empty());
}

pub async fn concurrent_appends_to_one_stream_with_any_version_all_land(harness: &dyn Harness) {
    let store = harness.store();
    let name = stream("shared");
    let writers: Vec<_> = (0..8)
        .map(|writer| {
            let store = store.clone();
            let name = name.clone();
            tokio::spawn(async move {
                for n in 0..20 {
                    let appends =
                        to_stream(&name, ExpectedVersion::Any, vec![message(writer * 100 + n)]);
                    store.append(appends).await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }

    let stored = store.read_stream(&name, 0, 1000).await.unwrap();
    let positions: Vec<_> = stored.iter().map(|m| m.position).collect();
    assert_eq!(positions, (0..160).collect::<Vec<_>>());
}

pub async fn a_subscriber_is_woken_by_an_append(harness: &dyn Harness) {
    let store = harness.store();
    let mut subscription = store.subscribe();
    // The first wake-up may be the listener announcing it is connected: consume it.
    let _ = tokio::time::timeout(Duration::from_millis(500), subscription.next()).await;

    write(store.as_ref(), &stream("thing"), ExpectedVersion::Any, 1).await;

    let wake = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("no wake-up within 10 s of an append");
    assert_eq!(wake, Wake::Signalled);
}

pub async fn a_subscriber_is_woken_after_its_connection_is_dropped(harness: &Postgres) {
    let store = harness.store();
    let mut subscription = store.subscribe();
    let _ = tokio::time::timeout(Duration::from_millis(500), subscription.next()).await;

    harness.drop_connections().await;
    // Drain the wake-ups that announce the reconnection itself.
    while tokio::time::timeout(Duration::from_millis(1500), subscription.next())
        .await
        .is_ok()
    {}

    write(store.as_ref(), &stream("thing"), ExpectedVersion::Any, 1).await;

    let wake = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("no wake-up within 10 s of an append after a reconnect");
    assert_eq!(wake, Wake::Signalled);
}

/// Five messages of two kinds, for the pruning cases: after pruning, 0 (the first), 3 (the last
/// success) and 4 (the last failure) are left.
async fn append_successes_and_failures(store: &dyn MessageStore, stream: &StreamName) {
    let kinds = ["Succeeded", "Failed", "Succeeded", "Succeeded", "Failed"];
    let messages = kinds
        .iter()
        .enumerate()
        .map(|(n, kind)| NewMessage::new(*kind, json!({ "n": n })))
        .collect();
    append_settled(
        store,
        to_stream(stream, ExpectedVersion::NoStream, messages),
    )
    .await;
}

pub async fn pruning_a_category_keeps_the_first_message_and_the_last_of_each_type(
    harness: &dyn Harness,
) {
    let store = harness.store();
    let pruned = stream("audit");
    let other = stream("audit");
    let kept = stream("thing");
    append_successes_and_failures(store.as_ref(), &pruned).await;
    write_settled(store.as_ref(), &other, ExpectedVersion::NoStream, 1).await;
    write_settled(store.as_ref(), &kept, ExpectedVersion::NoStream, 3).await;

    let before_any =
        store.read_stream(&pruned, 0, 1).await.unwrap()[0].time - chrono::Duration::seconds(1);
    assert_eq!(store.prune_category("audit", before_any).await.unwrap(), 0);
    let newest = store.last_message(&kept).await.unwrap().unwrap().time;
    let later = newest + chrono::Duration::seconds(60);
    let deleted = store.prune_category("audit", later).await.unwrap();

    assert_eq!(deleted, 2);
    let left: Vec<_> = store
        .read_stream(&pruned, 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| (m.position, m.message_type.clone()))
        .collect();
    assert_eq!(
        left,
        vec![
            (0, "Succeeded".to_owned()),
            (3, "Succeeded".to_owned()),
            (4, "Failed".to_owned())
        ]
    );
    assert_eq!(store.read_stream(&other, 0, 10).await.unwrap().len(), 1);
    assert_eq!(store.read_stream(&kept, 0, 10).await.unwrap().len(), 3);
    let again = store
        .append(append(&pruned, ExpectedVersion::NoStream, 1))
        .await;
    assert_eq!(
        conflict(again),
        (pruned.clone(), ExpectedVersion::NoStream, Some(4)),
        "a pruned stream must still exist"
    );
}

pub async fn after_pruning_an_exact_version_holds_only_at_the_last_position(harness: &dyn Harness) {
    let store = harness.store();
    let pruned = stream("audit");
    append_successes_and_failures(store.as_ref(), &pruned).await;
    let later =
        store.last_message(&pruned).await.unwrap().unwrap().time + chrono::Duration::seconds(60);
    assert_eq!(store.prune_category("audit", later).await.unwrap(), 2);
    // Left: 0, 3 and 4; positions 1 and 2 are holes, and message 0 and 3 still exist.

    for stale in [0, 1, 2, 3] {
        let refused = store
            .append(append(&pruned, ExpectedVersion::Exact(stale), 1))
            .await;
        assert_eq!(
            conflict(refused),
            (pruned.clone(), ExpectedVersion::Exact(stale), Some(4)),
            "Exact({stale}) on a stream whose last position is 4 must be refused"
        );
    }
    let positions: Vec<_> = store
        .read_stream(&pruned, 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.position)
        .collect();
    assert_eq!(
        positions,
        vec![0, 3, 4],
        "a refused append wrote into a hole"
    );

    let appended = write(store.as_ref(), &pruned, ExpectedVersion::Exact(4), 1).await;
    assert_eq!(appended.messages[0].position, 5);
}

/// Every message of `stream`, in stream order.
async fn whole_stream(store: &dyn MessageStore, stream: &StreamName) -> Vec<RecordedMessage> {
    store.read_stream(stream, 0, 1000).await.unwrap()
}

pub async fn rewriting_a_message_replaces_its_data_and_keeps_everything_else(
    harness: &dyn Harness,
) {
    let store = harness.store();
    let name = stream("thing");
    let original = message(1);
    append_settled(
        store.as_ref(),
        to_stream(
            &name,
            ExpectedVersion::NoStream,
            vec![message(0), original.clone(), message(2)],
        ),
    )
    .await;
    write_settled(
        store.as_ref(),
        &stream("other"),
        ExpectedVersion::NoStream,
        1,
    )
    .await;
    let before = all(store.as_ref()).await;
    let sealed = json!({ "n": "sealed", "nested": { "kept": [1, 2, 3] } });

    assert!(
        store
            .rewrite_data(original.id, sealed.clone())
            .await
            .unwrap()
    );

    let expected: Vec<_> = before
        .iter()
        .cloned()
        .map(|mut message| {
            if message.id == original.id {
                message.data = sealed.clone();
            }
            message
        })
        .collect();
    assert_eq!(all(store.as_ref()).await, expected);
    let in_stream: Vec<_> = expected
        .iter()
        .filter(|m| m.stream == name)
        .cloned()
        .collect();
    assert_eq!(whole_stream(store.as_ref(), &name).await, in_stream);
    assert_eq!(
        store.read_category("thing", 0, 10).await.unwrap(),
        in_stream
    );
    assert_eq!(
        store.last_message(&name).await.unwrap().as_ref(),
        in_stream.last()
    );

    // The stored message is the rewritten one now: its original content is another message.
    let refused = store
        .append(to_stream(
            &name,
            ExpectedVersion::Any,
            vec![original.clone()],
        ))
        .await;
    assert!(
        matches!(refused, Err(AppendError::DuplicateMessageId { id }) if id == original.id),
        "{refused:?}"
    );
    let rewritten = NewMessage {
        data: sealed,
        ..original
    };
    let retried = store
        .append(to_stream(&name, ExpectedVersion::Any, vec![rewritten]))
        .await
        .unwrap();
    assert_eq!(
        (
            retried.messages[0].position,
            retried.messages[0].global_position
        ),
        (1, expected[1].global_position)
    );
    assert_eq!(all(store.as_ref()).await, expected);
}

pub async fn rewriting_a_message_that_is_not_stored_changes_nothing(harness: &dyn Harness) {
    let store = harness.store();
    write_settled(
        store.as_ref(),
        &stream("thing"),
        ExpectedVersion::NoStream,
        2,
    )
    .await;
    let before = all(store.as_ref()).await;

    let rewritten = store
        .rewrite_data(uuid::Uuid::new_v4(), json!({ "n": "sealed" }))
        .await
        .unwrap();

    assert!(!rewritten);
    assert_eq!(all(store.as_ref()).await, before);
}

pub async fn renaming_a_stream_moves_its_messages_with_their_positions(harness: &dyn Harness) {
    let store = harness.store();
    let from = stream("thing");
    let to = stream("renamed");
    let other = stream("thing");
    write_settled(store.as_ref(), &from, ExpectedVersion::NoStream, 3).await;
    write_settled(store.as_ref(), &other, ExpectedVersion::NoStream, 1).await;
    let before = all(store.as_ref()).await;

    let moved = store.rename_stream(&from, &to).await.unwrap();

    assert_eq!(moved, 3);
    let expected: Vec<_> = before
        .iter()
        .cloned()
        .map(|mut message| {
            if message.stream == from {
                message.stream = to.clone();
            }
            message
        })
        .collect();
    assert_eq!(
        all(store.as_ref()).await,
        expected,
        "only the stream names changed"
    );
    let renamed: Vec<_> = expected
        .iter()
        .filter(|m| m.stream == to)
        .cloned()
        .collect();
    assert_eq!(
        renamed.iter().map(|m| m.position).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(whole_stream(store.as_ref(), &to).await, renamed);
    assert_eq!(
        store.last_message(&to).await.unwrap().as_ref(),
        renamed.last()
    );
    assert_eq!(
        store.read_category("renamed", 0, 10).await.unwrap(),
        renamed
    );
    let left_in_category: Vec<_> = store
        .read_category("thing", 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.stream)
        .collect();
    assert_eq!(left_in_category, vec![other]);
    assert!(whole_stream(store.as_ref(), &from).await.is_empty());
    assert!(store.last_message(&from).await.unwrap().is_none());

    let next = write(store.as_ref(), &to, ExpectedVersion::Exact(2), 1).await;
    assert_eq!(next.messages[0].position, 3);
    let refused = store
        .append(append(&to, ExpectedVersion::NoStream, 1))
        .await;
    assert_eq!(
        conflict(refused),
        (to.clone(), ExpectedVersion::NoStream, Some(3))
    );
    let reused = write(store.as_ref(), &from, ExpectedVersion::NoStream, 1).await;
    assert_eq!(
        reused.messages[0].position, 0,
        "the old name is a new, empty stream"
    );
}

pub async fn renaming_onto_a_stream_with_messages_is_refused_and_moves_nothing(
    harness: &dyn Harness,
) {
    let store = harness.store();
    let from = stream("thing");
    let to = stream("thing");
    write_settled(store.as_ref(), &from, ExpectedVersion::NoStream, 2).await;
    write_settled(store.as_ref(), &to, ExpectedVersion::NoStream, 1).await;
    let before = all(store.as_ref()).await;

    for (target, taken) in [(&to, &to), (&from, &from)] {
        let refused = store.rename_stream(&from, target).await;
        assert!(
            matches!(&refused, Err(RenameStreamError::TargetNotEmpty { to }) if to == taken),
            "{refused:?}"
        );
    }
    let missing = stream("thing");
    let refused = store.rename_stream(&missing, &to).await;
    assert!(
        matches!(refused, Err(RenameStreamError::TargetNotEmpty { .. })),
        "{refused:?}"
    );

    assert_eq!(all(store.as_ref()).await, before);
}

pub async fn renaming_a_stream_without_messages_moves_none(harness: &dyn Harness) {
    let store = harness.store();
    write_settled(
        store.as_ref(),
        &stream("thing"),
        ExpectedVersion::NoStream,
        1,
    )
    .await;
    let before = all(store.as_ref()).await;
    let to = stream("thing");

    let moved = store.rename_stream(&stream("thing"), &to).await.unwrap();

    assert_eq!(moved, 0);
    assert_eq!(all(store.as_ref()).await, before);
    let first = write(store.as_ref(), &to, ExpectedVersion::NoStream, 1).await;
    assert_eq!(first.messages[0].position, 0);
}
