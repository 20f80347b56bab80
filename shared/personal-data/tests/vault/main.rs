//! Vault tests: one conformance suite run against every adapter (PostgreSQL in a fresh
//! database, SQLite in a fresh file), and what only PostgreSQL has to prove: one key for
//! concurrent first writers across processes, and its answers when the database goes away.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod harness;
mod postgres;
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
                    let harness = crate::harness::Sqlite::new();
                    crate::suite::$name(&harness).await;
                }
            )*
        }
    };
}

conformance!(
    a_persons_key_is_made_once_and_read_back_the_same,
    the_keys_of_several_persons_are_read_at_once_and_only_existing_ones_come_back,
    an_erased_person_has_no_key_and_never_gets_one_again,
    erasing_a_person_who_never_had_a_key_leaves_a_tombstone,
    the_fields_of_an_erased_person_read_as_null_after_a_round_trip_through_the_vault,
    a_rotation_keeps_every_key_readable_and_rewrap_moves_them_to_the_current_master_key,
    a_key_that_does_not_unwrap_under_the_master_key_its_row_names_is_corrupt_not_erased,
    the_database_never_holds_a_persons_key_in_clear,
    the_vault_shares_its_database_with_the_message_store,
    a_sealer_seals_on_write_and_opens_a_batch_read_from_the_store_erased_or_not,
    a_vault_answers_a_ping,
);
