//! Store tests: one conformance suite run against every adapter, and the PostgreSQL
//! concurrency test of the global order.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod concurrency;
mod faults;
mod fixtures;
mod harness;
mod positions;
mod suite;

/// Instantiates every conformance test once per adapter.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod postgres_adapter {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let harness = crate::harness::Postgres::new().await;
                    crate::suite::$name(&harness).await;
                }
            )*
        }
        mod sqlite_adapter {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let harness = crate::harness::Sqlite::new().await;
                    crate::suite::$name(&harness).await;
                }
            )*
        }
    };
}

conformance!(
    the_first_message_of_a_stream_is_at_position_zero,
    appending_with_no_stream_to_an_existing_stream_is_a_conflict_naming_the_actual_version,
    appending_with_a_stale_exact_version_is_a_conflict,
    appending_with_the_current_exact_version_succeeds,
    appending_with_any_version_always_succeeds,
    repeating_an_append_with_the_same_ids_writes_nothing_twice,
    reusing_a_message_id_for_other_content_is_refused,
    an_append_to_several_streams_is_all_or_nothing,
    an_append_to_several_streams_writes_them_all,
    a_stream_is_read_forward_in_batches,
    the_last_message_of_a_stream_is_found,
    all_messages_are_read_in_batches_in_global_order,
    a_category_read_returns_only_that_category,
    the_head_and_last_positions_and_backlog_follow_appends,
    invalid_appends_are_refused_before_writing,
    concurrent_appends_to_one_stream_with_any_version_all_land,
    a_subscriber_is_woken_by_an_append,
    pruning_a_category_keeps_the_first_message_and_the_last_of_each_type,
    after_pruning_an_exact_version_holds_only_at_the_last_position,
    rewriting_a_message_replaces_its_data_and_keeps_everything_else,
    rewriting_a_message_that_is_not_stored_changes_nothing,
    renaming_a_stream_moves_its_messages_with_their_positions,
    renaming_onto_a_stream_with_messages_is_refused_and_moves_nothing,
    renaming_a_stream_without_messages_moves_none,
);

/// PostgreSQL only: its wake-ups travel on a LISTEN connection, which a network failure or a
/// server restart can cut. The SQLite adapter's wake-ups are an in-process signal with no
/// connection to lose, so there this case would only repeat `a_subscriber_is_woken_by_an_append`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_is_woken_after_its_listening_connection_is_dropped_on_postgres() {
    let harness = crate::harness::Postgres::new().await;
    crate::suite::a_subscriber_is_woken_after_its_connection_is_dropped(&harness).await;
}
