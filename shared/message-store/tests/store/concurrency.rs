//! The global order under concurrent writers, on PostgreSQL: a reader tailing from position 0
//! must see every committed message exactly once, in increasing global position, and never one
//! that was rolled back, while writers commit out of order. And a stream rename, atomic against
//! the appends that race it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use message_store::{
    ExpectedVersion, MessageStore, NewMessage, RecordedMessage, StreamAppend, StreamName,
};
use serde_json::json;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::fixtures::{append, stream};
use crate::harness::Postgres;

const FAST_WRITERS: u64 = 8;
const APPENDS_PER_FAST_WRITER: u64 = 1_500;
const SLOW_WRITERS: u64 = 3;
const TRANSACTIONS_PER_SLOW_WRITER: u64 = 60;

#[derive(Default)]
struct Ledger {
    committed: HashSet<Uuid>,
    rolled_back: HashSet<Uuid>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tailing_reader_sees_every_committed_message_once_in_order_despite_out_of_order_commits()
{
    tail_while_writers_commit_out_of_order(0).await;
}

/// The same on a store whose positions carry an offset, as one restored into a younger cluster
/// does (docs/adr/0007): the readers' horizon and the writers' positions move together.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_global_order_skips_nothing_on_a_store_with_a_position_offset() {
    tail_while_writers_commit_out_of_order(1 << 32).await;
}

async fn tail_while_writers_commit_out_of_order(position_offset: i64) {
    let harness = Postgres::new().await;
    sqlx::query("UPDATE message_store_position_offset SET transactions = $1")
        .bind(position_offset)
        .execute(&harness.pool)
        .await
        .unwrap();
    let pool = harness
        .database
        .pool_with(sqlx::postgres::PgPoolOptions::new().max_connections(24))
        .await;
    let store = Arc::new(message_store::PostgresMessageStore::new(
        pool.clone(),
        Duration::from_millis(20),
    ));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let shared_streams: Vec<StreamName> = (0..4).map(|_| stream("shared")).collect();

    let tailed = Arc::new(Mutex::new(Vec::new()));
    let reader = tokio::spawn(tail(store.clone(), tailed.clone()));

    let mut writers = Vec::new();
    for writer in 0..FAST_WRITERS {
        writers.push(tokio::spawn(fast_writer(
            writer,
            store.clone(),
            shared_streams.clone(),
            ledger.clone(),
        )));
    }
    for writer in 0..SLOW_WRITERS {
        writers.push(tokio::spawn(slow_writer(
            writer,
            store.clone(),
            ledger.clone(),
        )));
    }
    for writer in writers {
        writer.await.unwrap();
    }

    let ledger = ledger.lock().await;
    let expected = ledger.committed.len();
    // Every writer has finished. Their messages become visible to global readers once every
    // older transaction on the server has ended, including other tests' (docs/adr/0002): wait
    // for that, then for the reader to reach the head.
    let visible = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let visible = store.count_after(0).await.unwrap();
            if visible >= expected as u64 {
                break visible;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the committed messages never all became visible");
    assert_eq!(
        visible, expected as u64,
        "more messages are visible than were committed"
    );
    let head = store.head_position().await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let tailed = tailed.lock().await;
            if tailed
                .last()
                .is_some_and(|last| last.global_position >= head)
            {
                break tailed.clone();
            }
            drop(tailed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the reader never reached the head");
    reader.abort();

    assert!(
        read.windows(2)
            .all(|pair| pair[0].global_position < pair[1].global_position),
        "the reader saw positions out of order"
    );
    let read_ids: HashSet<Uuid> = read.iter().map(|m| m.id).collect();
    assert_eq!(read_ids.len(), read.len(), "the reader saw a message twice");
    let missed = ledger.committed.difference(&read_ids).count();
    assert_eq!(missed, 0, "the reader skipped {missed} committed messages");
    assert!(
        read_ids.is_disjoint(&ledger.rolled_back),
        "the reader saw a rolled-back message"
    );
    assert_eq!(read.len(), expected);
    assert!(
        !ledger.rolled_back.is_empty(),
        "no transaction was rolled back: the test is too weak"
    );
}

/// Follows the store from position 0 like a projection does: read a batch after the last
/// position seen, wait for a wake-up when there is nothing new.
async fn tail(
    store: Arc<message_store::PostgresMessageStore>,
    tailed: Arc<Mutex<Vec<RecordedMessage>>>,
) {
    let mut subscription = store.subscribe();
    let mut after = 0;
    loop {
        let batch = store.read_all(after, 100).await.unwrap();
        if batch.is_empty() {
            subscription.next().await;
            continue;
        }
        after = batch.last().unwrap().global_position;
        tailed.lock().await.extend(batch);
    }
}

/// Appends through the store: its own stream one message at a time, every tenth append to a
/// shared stream (racing the other writers), every fiftieth to two streams at once.
async fn fast_writer(
    writer: u64,
    store: Arc<message_store::PostgresMessageStore>,
    shared: Vec<StreamName>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let own = stream("own");
    for n in 0..APPENDS_PER_FAST_WRITER {
        let first = NewMessage::new("Written", json!({ "writer": writer, "n": n }));
        let target = if n % 10 == 0 {
            shared[usize::try_from(n / 10).unwrap() % shared.len()].clone()
        } else {
            own.clone()
        };
        let mut appends = vec![StreamAppend::new(target, ExpectedVersion::Any, vec![first])];
        if n % 50 == 1 {
            appends.push(StreamAppend::new(
                stream("pair"),
                ExpectedVersion::NoStream,
                vec![NewMessage::new(
                    "Paired",
                    json!({ "writer": writer, "n": n }),
                )],
            ));
        }
        let appended = store.append(appends).await.unwrap();
        ledger
            .lock()
            .await
            .committed
            .extend(appended.messages.iter().map(|m| m.id));
    }
}

/// Holds its transactions open for a while after writing, so that transactions which started
/// later commit first; one in four is rolled back.
async fn slow_writer(
    writer: u64,
    store: Arc<message_store::PostgresMessageStore>,
    ledger: Arc<Mutex<Ledger>>,
) {
    for n in 0..TRANSACTIONS_PER_SLOW_WRITER {
        let slow = stream("slow");
        let messages = vec![
            NewMessage::new("Slow", json!({ "writer": writer, "n": n })),
            NewMessage::new("Slow", json!({ "writer": writer, "n": n, "second": true })),
        ];
        let mut tx = store.pool().begin().await.unwrap();
        let appended = store
            .append_within(
                &mut tx,
                vec![StreamAppend::new(slow, ExpectedVersion::NoStream, messages)],
            )
            .await
            .unwrap();
        let ids = appended.messages.iter().map(|m| m.id);
        let hold = Duration::from_millis(5 + (n * 7 + writer * 13) % 40);
        tokio::time::sleep(hold).await;
        if n % 4 == 3 {
            tx.rollback().await.unwrap();
            ledger.lock().await.rolled_back.extend(ids);
        } else {
            tx.commit().await.unwrap();
            store.notify_committed();
            ledger.lock().await.committed.extend(ids);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_held_back_by_an_open_transaction_counts_for_the_last_position_only() {
    let harness = Postgres::new().await;
    let store = harness.store.clone();
    // A transaction with an id, left open: readers may not pass it, whatever commits later.
    let mut open = harness.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *open)
        .await
        .unwrap();

    let appended = store
        .append(append(&stream("thing"), ExpectedVersion::Any, 1))
        .await
        .unwrap();

    let committed = appended.last_global_position();
    assert!(store.head_position().await.unwrap() < committed);
    assert_eq!(store.last_position().await.unwrap(), committed);
    open.rollback().await.unwrap();
}

const RENAMED_STREAMS: usize = 3;
const RENAMES_PER_STREAM: usize = 4;

/// A rename is atomic against appends on PostgreSQL, whose first attempt at an append takes no
/// lock (docs/adr/0004): writers keep appending to their streams while those are renamed again
/// and again, and every message ends up in exactly one stream, each stream holding positions 0,
/// 1, 2, ... with no gap. An append that escaped a rename would stay behind in the old stream,
/// after positions that had moved away. One writer per stream: writers racing each other on one
/// stream would test the append's own retries, not the rename. Each rename waits for its
/// stream to have messages, and the writers go on until every stream has some after its last
/// rename, however fast or busy the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_racing_renames_of_their_streams_each_land_once_without_gaps() {
    let harness = Postgres::new().await;
    let pool = harness
        .database
        .pool_with(sqlx::postgres::PgPoolOptions::new().max_connections(12))
        .await;
    let store = Arc::new(message_store::PostgresMessageStore::new(
        pool,
        Duration::from_millis(20),
    ));
    let busy: Vec<StreamName> = (0..RENAMED_STREAMS).map(|_| stream("busy")).collect();
    let renamed = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = busy
        .iter()
        .map(|name| {
            let (store, name, renamed) = (store.clone(), name.clone(), renamed.clone());
            tokio::spawn(async move {
                let mut appended = HashSet::new();
                for n in 0.. {
                    if renamed.load(Ordering::Relaxed) {
                        break;
                    }
                    let message = NewMessage::new("Written", json!({ "n": n }));
                    appended.insert(message.id);
                    let appends = vec![StreamAppend::new(
                        name.clone(),
                        ExpectedVersion::Any,
                        vec![message],
                    )];
                    store.append(appends).await.unwrap();
                }
                appended
            })
        })
        .collect();

    let mut streams = busy.clone();
    let mut moved = Vec::new();
    for _ in 0..RENAMES_PER_STREAM {
        for from in &busy {
            written_to(store.as_ref(), from).await;
            let to = stream("busy");
            moved.push(store.rename_stream(from, &to).await.unwrap());
            streams.push(to);
        }
    }
    for name in &busy {
        written_to(store.as_ref(), name).await;
    }
    renamed.store(true, Ordering::Relaxed);
    let mut appended = HashSet::new();
    for writer in writers {
        appended.extend(writer.await.unwrap());
    }

    let mut stored = HashSet::new();
    for name in &streams {
        let messages = store.read_stream(name, 0, 10_000).await.unwrap();
        let positions: Vec<_> = messages.iter().map(|m| m.position).collect();
        let count = u64::try_from(positions.len()).unwrap();
        assert_eq!(
            positions,
            (0..count).collect::<Vec<_>>(),
            "stream {name} has a gap or does not start at 0"
        );
        stored.extend(messages.iter().map(|m| m.id));
    }
    assert_eq!(stored, appended, "a message was lost or landed twice");
    let mut left = 0;
    for name in &busy {
        left += store.read_stream(name, 0, 10_000).await.unwrap().len() as u64;
    }
    assert_eq!(moved.iter().sum::<u64>() + left, appended.len() as u64);
    assert!(
        left > 0 && moved.iter().all(|moved| *moved > 0),
        "the renames did not race the appends: the test is too weak ({moved:?} moved, {left} \
         left)"
    );
}

/// Waits until `stream` has a message.
async fn written_to(store: &message_store::PostgresMessageStore, stream: &StreamName) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while store.last_message(stream).await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("a writer never appended to its stream");
}
