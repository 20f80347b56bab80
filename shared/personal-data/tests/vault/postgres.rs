//! What only the PostgreSQL adapter has to prove: several processes, each with a pool of its
//! own, race to make one person's key; and its answers when its database goes away.

use std::sync::Arc;

use personal_data::{KeyCounts, MasterKey, MasterKeys};
use tokio::sync::Barrier;
use uuid::Uuid;

use crate::harness::{Harness, Postgres};

const VAULTS: usize = 4;
const WRITERS_PER_PERSON: usize = 16;
const PERSONS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_writers_of_one_person_all_get_the_same_key() {
    let harness = Postgres::new().await;
    let master_keys = MasterKeys::new(MasterKey::generate("1").unwrap(), vec![]).unwrap();
    let mut vaults = Vec::new();
    for _ in 0..VAULTS {
        vaults.push(harness.vault(&master_keys).await);
    }

    for _ in 0..PERSONS {
        let person = Uuid::new_v4();
        let start = Arc::new(Barrier::new(WRITERS_PER_PERSON));
        let writers = (0..WRITERS_PER_PERSON).map(|writer| {
            let vault = vaults[writer % VAULTS].clone();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                vault.key_for_writing(person).await.unwrap()
            })
        });
        let keys = futures::future::try_join_all(writers).await.unwrap();

        let envelope = keys[0].seal(person, "email", &serde_json::json!("ann@example.com"));
        for key in &keys {
            assert!(
                key.open(person, "email", &envelope).is_ok(),
                "two writers got different keys for one person"
            );
        }
    }
    assert_eq!(
        vaults[0].count_by_master_key().await.unwrap(),
        KeyCounts {
            by_master_key: vec![("1".to_owned(), PERSONS as u64)],
            erased: 0
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_whose_database_refuses_connections_is_unavailable_until_it_is_back() {
    let harness = Postgres::new().await;
    let master_keys = MasterKeys::new(MasterKey::generate("1").unwrap(), vec![]).unwrap();
    let vault = harness.vault(&master_keys).await;
    let person = Uuid::new_v4();
    vault.key_for_writing(person).await.unwrap();

    harness.database.close_to_connections(true).await;
    harness.database.end_sessions().await;
    let error = vault.keys(&[person]).await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
    let error = vault.ping().await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");

    harness.database.close_to_connections(false).await;
    vault.ping().await.unwrap();
    assert!(vault.keys(&[person]).await.unwrap().contains_key(&person));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_server_ends_every_session_the_next_call_runs_on_a_new_connection() {
    let harness = Postgres::new().await;
    let master_keys = MasterKeys::new(MasterKey::generate("1").unwrap(), vec![]).unwrap();
    let vault = harness.vault(&master_keys).await;
    let person = Uuid::new_v4();
    vault.key_for_writing(person).await.unwrap();

    // As a server restart does: every pooled connection is dead, and the vault does not ping
    // before each use.
    harness.database.end_sessions().await;
    assert!(vault.keys(&[person]).await.unwrap().contains_key(&person));
    harness.database.end_sessions().await;
    vault.key_for_writing(Uuid::new_v4()).await.unwrap();
}
