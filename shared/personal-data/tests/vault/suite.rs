//! The conformance suite: what every vault adapter must do, each case run against each adapter
//! by `main.rs`.

use base64::Engine;
use message_store::{ExpectedVersion, NewMessage, StreamAppend, StreamName};
use personal_data::{
    KeyCounts, MasterKey, MasterKeys, PersonKey, Sealer, Unsealed, VaultError, seal_fields,
    sealed_persons, unseal_fields,
};
use serde_json::json;
use uuid::Uuid;

use crate::harness::Harness;

fn master_keys(current: &MasterKey, retired: &[&MasterKey]) -> MasterKeys {
    MasterKeys::new(current.clone(), retired.iter().copied().cloned().collect()).unwrap()
}

fn one_master_key() -> MasterKeys {
    master_keys(&MasterKey::generate("1").unwrap(), &[])
}

/// Whether two keys are the same key: what one seals, the other opens.
fn same_key(one: &PersonKey, other: &PersonKey) -> bool {
    let person = Uuid::new_v4();
    let envelope = one.seal(person, "email", &json!("ann@example.com"));
    other.open(person, "email", &envelope).is_ok()
}

fn counts(by_master_key: &[(&str, u64)], erased: u64) -> KeyCounts {
    KeyCounts {
        by_master_key: by_master_key
            .iter()
            .map(|(id, count)| ((*id).to_owned(), *count))
            .collect(),
        erased,
    }
}

pub async fn a_persons_key_is_made_once_and_read_back_the_same(harness: &impl Harness) {
    let keys = one_master_key();
    let vault = harness.vault(&keys).await;
    let person = Uuid::new_v4();

    let first = vault.key_for_writing(person).await.unwrap();
    let again = vault.key_for_writing(person).await.unwrap();
    assert!(same_key(&first, &again));
    assert!(!same_key(
        &first,
        &vault.key_for_writing(Uuid::new_v4()).await.unwrap()
    ));

    // Another process on the same database reads the same key.
    let reopened = harness.vault(&keys).await;
    let read = reopened.keys(&[person]).await.unwrap();
    assert!(same_key(&first, &read[&person]));
    assert!(same_key(
        &first,
        &reopened.key_for_writing(person).await.unwrap()
    ));
    assert!(!vault.is_erased(person).await.unwrap());
    assert_eq!(
        vault.count_by_master_key().await.unwrap(),
        counts(&[("1", 2)], 0)
    );
}

pub async fn the_keys_of_several_persons_are_read_at_once_and_only_existing_ones_come_back(
    harness: &impl Harness,
) {
    let vault = harness.vault(&one_master_key()).await;
    let persons: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let mut written = Vec::new();
    for person in &persons {
        written.push(vault.key_for_writing(*person).await.unwrap());
    }
    let never_given_a_key = Uuid::new_v4();

    let asked = [
        persons.clone(),
        vec![never_given_a_key, persons[0], persons[0]],
    ]
    .concat();
    let read = vault.keys(&asked).await.unwrap();
    assert_eq!(read.len(), persons.len());
    for (person, key) in persons.iter().zip(&written) {
        assert!(same_key(key, &read[person]), "{person}");
    }
    assert!(!read.contains_key(&never_given_a_key));
    assert!(vault.keys(&[]).await.unwrap().is_empty());
    assert!(vault.keys(&[never_given_a_key]).await.unwrap().is_empty());
}

pub async fn an_erased_person_has_no_key_and_never_gets_one_again(harness: &impl Harness) {
    let vault = harness.vault(&one_master_key()).await;
    let (person, other) = (Uuid::new_v4(), Uuid::new_v4());
    vault.key_for_writing(person).await.unwrap();
    let others_key = vault.key_for_writing(other).await.unwrap();

    assert!(vault.erase(person).await.unwrap(), "there was a key");
    assert!(vault.is_erased(person).await.unwrap());
    let read = vault.keys(&[person, other]).await.unwrap();
    assert!(!read.contains_key(&person));
    assert!(same_key(&others_key, &read[&other]), "others keep theirs");
    assert!(matches!(
        vault.key_for_writing(person).await,
        Err(VaultError::Erased)
    ));

    // Idempotent: nothing more to erase, and still no key.
    assert!(!vault.erase(person).await.unwrap());
    assert!(matches!(
        vault.key_for_writing(person).await,
        Err(VaultError::Erased)
    ));
    assert_eq!(
        vault.count_by_master_key().await.unwrap(),
        counts(&[("1", 1)], 1)
    );
}

pub async fn erasing_a_person_who_never_had_a_key_leaves_a_tombstone(harness: &impl Harness) {
    let vault = harness.vault(&one_master_key()).await;
    let person = Uuid::new_v4();
    assert!(!vault.is_erased(person).await.unwrap());

    assert!(!vault.erase(person).await.unwrap(), "there was no key");
    assert!(vault.is_erased(person).await.unwrap());
    assert!(matches!(
        vault.key_for_writing(person).await,
        Err(VaultError::Erased)
    ));
    assert!(!vault.erase(person).await.unwrap());
    assert_eq!(vault.count_by_master_key().await.unwrap(), counts(&[], 1));
}

pub async fn the_fields_of_an_erased_person_read_as_null_after_a_round_trip_through_the_vault(
    harness: &impl Harness,
) {
    let vault = harness.vault(&one_master_key()).await;
    let (ann, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mut data = json!({"email": "ann@example.com", "referee": "bob@example.com", "n": 1});
    seal_fields(
        &vault.key_for_writing(ann).await.unwrap(),
        ann,
        &mut data,
        &["email"],
    );
    seal_fields(
        &vault.key_for_writing(bob).await.unwrap(),
        bob,
        &mut data,
        &["referee"],
    );
    let stored = data.clone();

    let keys = vault.keys(&sealed_persons(&stored)).await.unwrap();
    let mut read = stored.clone();
    let unsealed = unseal_fields(&mut read, |person| keys.get(&person)).unwrap();
    assert_eq!(
        read,
        json!({"email": "ann@example.com", "referee": "bob@example.com", "n": 1})
    );
    assert!(!unsealed.erased);

    vault.erase(ann).await.unwrap();
    let keys = vault.keys(&sealed_persons(&stored)).await.unwrap();
    let mut read = stored;
    let unsealed = unseal_fields(&mut read, |person| keys.get(&person)).unwrap();
    assert_eq!(
        read,
        json!({"email": null, "referee": "bob@example.com", "n": 1})
    );
    assert_eq!(
        unsealed,
        Unsealed {
            erased: true,
            opened: 1
        }
    );
}

pub async fn a_rotation_keeps_every_key_readable_and_rewrap_moves_them_to_the_current_master_key(
    harness: &impl Harness,
) {
    let (a, b) = (
        MasterKey::generate("a").unwrap(),
        MasterKey::generate("b").unwrap(),
    );
    let persons: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let erased = Uuid::new_v4();
    let under_a = harness.vault(&master_keys(&a, &[])).await;
    let mut envelopes = Vec::new();
    for person in &persons {
        let key = under_a.key_for_writing(*person).await.unwrap();
        envelopes.push(key.seal(*person, "email", &json!(format!("{person}@example.com"))));
    }
    under_a.key_for_writing(erased).await.unwrap();
    under_a.erase(erased).await.unwrap();
    let opens_every_envelope = |keys: std::collections::HashMap<Uuid, PersonKey>| {
        persons.iter().zip(&envelopes).all(|(person, envelope)| {
            keys[person].open(*person, "email", envelope).unwrap()
                == json!(format!("{person}@example.com"))
        })
    };

    // B current, A retired: keys under A are read, new ones are made under B.
    let rotating = harness.vault(&master_keys(&b, &[&a])).await;
    assert!(opens_every_envelope(rotating.keys(&persons).await.unwrap()));
    let newcomer = Uuid::new_v4();
    let newcomers_key = rotating.key_for_writing(newcomer).await.unwrap();
    assert_eq!(
        rotating.count_by_master_key().await.unwrap(),
        counts(&[("a", 3), ("b", 1)], 1)
    );

    assert_eq!(rotating.rewrap().await.unwrap(), 3);
    assert_eq!(
        rotating.count_by_master_key().await.unwrap(),
        counts(&[("b", 4)], 1)
    );
    assert_eq!(
        rotating.rewrap().await.unwrap(),
        0,
        "nothing left to rewrap"
    );
    assert!(matches!(
        rotating.key_for_writing(erased).await,
        Err(VaultError::Erased)
    ));

    // The retired key dropped: everything is read under B alone.
    let rotated = harness.vault(&master_keys(&b, &[])).await;
    assert!(opens_every_envelope(rotated.keys(&persons).await.unwrap()));
    assert!(same_key(
        &newcomers_key,
        &rotated.key_for_writing(newcomer).await.unwrap()
    ));

    // A process still holding only A cannot read the rewrapped keys, and says why rather than
    // taking the persons for erased.
    let stale = harness.vault(&master_keys(&a, &[])).await;
    assert!(matches!(
        stale.keys(&persons).await,
        Err(VaultError::UnknownMasterKey(id)) if id == "b"
    ));
    assert!(matches!(
        stale.key_for_writing(persons[0]).await,
        Err(VaultError::UnknownMasterKey(id)) if id == "b"
    ));
    assert!(matches!(
        stale.rewrap().await,
        Err(VaultError::UnknownMasterKey(id)) if id == "b"
    ));
}

pub async fn a_key_that_does_not_unwrap_under_the_master_key_its_row_names_is_corrupt_not_erased(
    harness: &impl Harness,
) {
    let person = Uuid::new_v4();
    let vault = harness.vault(&one_master_key()).await;
    vault.key_for_writing(person).await.unwrap();

    // Other bytes under the same id: the wrong key was configured.
    let impostor = harness.vault(&one_master_key()).await;
    assert!(matches!(
        impostor.keys(&[person]).await,
        Err(VaultError::Corrupt { .. })
    ));
    assert!(matches!(
        impostor.key_for_writing(person).await,
        Err(VaultError::Corrupt { .. })
    ));
    assert!(!impostor.is_erased(person).await.unwrap());
}

pub async fn the_database_never_holds_a_persons_key_in_clear(harness: &impl Harness) {
    let keys = one_master_key();
    let vault = harness.vault(&keys).await;
    let (person, rotated) = (Uuid::new_v4(), Uuid::new_v4());
    let key = vault.key_for_writing(person).await.unwrap();
    // A key rewritten by a rotation is stored wrapped too.
    let next = MasterKey::generate("2").unwrap();
    let next_keys = master_keys(&next, &[keys.current()]);
    let rotated_key = vault.key_for_writing(rotated).await.unwrap();
    harness.vault(&next_keys).await.rewrap().await.unwrap();

    let stored = harness.stored_bytes().await;
    assert!(
        contains(&stored, person.to_string().as_bytes()),
        "the stored bytes hold the person's row"
    );
    for secret in [&key, &rotated_key] {
        let hex_digits = secret.to_hex().expose_secret().clone();
        let raw = hex::decode(&hex_digits).unwrap();
        for form in [
            raw.clone(),
            hex_digits.clone().into_bytes(),
            hex_digits.to_uppercase().into_bytes(),
            base64::engine::general_purpose::STANDARD
                .encode(&raw)
                .into_bytes(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(&raw)
                .into_bytes(),
        ] {
            assert!(!contains(&stored, &form), "a key is stored in clear");
        }
    }
    for master_key in [keys.current(), &next] {
        let hex_digits = master_key.to_hex().expose_secret().clone();
        assert!(!contains(&stored, &hex::decode(&hex_digits).unwrap()));
        assert!(!contains(&stored, hex_digits.as_bytes()));
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

pub async fn the_vault_shares_its_database_with_the_message_store(harness: &impl Harness) {
    let url = harness.url();
    // Either order, any number of times: each migration set ignores the other's versions.
    message_store::migrate(&url).await.unwrap();
    personal_data::migrate(&url).await.unwrap();
    personal_data::migrate(&url).await.unwrap();
    message_store::migrate(&url).await.unwrap();

    let store = message_store::connect(&url, message_store::ConnectOptions::default())
        .await
        .unwrap();
    let vault = harness.vault(&one_master_key()).await;
    let person = Uuid::new_v4();
    let mut data = json!({"email": "ann@example.com"});
    seal_fields(
        &vault.key_for_writing(person).await.unwrap(),
        person,
        &mut data,
        &["email"],
    );
    let stream = StreamName::parse(format!("user-{person}")).unwrap();
    store
        .append(vec![StreamAppend::new(
            stream.clone(),
            ExpectedVersion::NoStream,
            vec![NewMessage::new("Registered", data)],
        )])
        .await
        .unwrap();

    let mut read = store.last_message(&stream).await.unwrap().unwrap().data;
    let keys = vault.keys(&sealed_persons(&read)).await.unwrap();
    unseal_fields(&mut read, |person| keys.get(&person)).unwrap();
    assert_eq!(read, json!({"email": "ann@example.com"}));
}

pub async fn a_sealer_seals_on_write_and_opens_a_batch_read_from_the_store_erased_or_not(
    harness: &impl Harness,
) {
    let url = harness.url();
    message_store::migrate(&url).await.unwrap();
    let store = message_store::connect(&url, message_store::ConnectOptions::default())
        .await
        .unwrap();
    let sealer = Sealer::new(harness.vault(&one_master_key()).await);
    let (ann, bob) = (Uuid::new_v4(), Uuid::new_v4());
    for (person, email) in [(ann, "ann@example.com"), (bob, "bob@example.com")] {
        let mut data = json!({"email": email, "at": "2026-12-01T00:00:00Z"});
        sealer.seal(person, &["email"], &mut data).await.unwrap();
        assert!(!data.to_string().contains(email), "{data}");
        let mut unsealed_too = json!({"at": "2026-12-01T00:00:00Z"});
        sealer.seal(person, &[], &mut unsealed_too).await.unwrap();
        assert_eq!(unsealed_too, json!({"at": "2026-12-01T00:00:00Z"}));
        store
            .append(vec![StreamAppend::new(
                StreamName::parse(format!("user-{person}")).unwrap(),
                ExpectedVersion::NoStream,
                vec![NewMessage::new("Registered", data)],
            )])
            .await
            .unwrap();
    }
    sealer.vault().erase(bob).await.unwrap();

    // Read by stream: a read of all streams only sees below the oldest transaction still
    // running in the whole cluster, which other tests may hold open for a moment.
    let mut batch = Vec::new();
    for person in [ann, bob] {
        let stream = StreamName::parse(format!("user-{person}")).unwrap();
        batch.push(store.last_message(&stream).await.unwrap().unwrap());
    }
    sealer.unseal_messages(&mut batch).await.unwrap();
    let emails: Vec<_> = batch
        .iter()
        .map(|message| message.data["email"].clone())
        .collect();
    assert_eq!(emails, [json!("ann@example.com"), json!(null)]);
    assert!(matches!(
        sealer
            .seal(bob, &["email"], &mut json!({"email": "bob@example.com"}))
            .await,
        Err(VaultError::Erased)
    ));

    // A sealed field altered in the store is an error, never read as erased.
    let ann_stream = StreamName::parse(format!("user-{ann}")).unwrap();
    let mut tampered = vec![store.last_message(&ann_stream).await.unwrap().unwrap()];
    let envelope = tampered[0].data["email"].as_object_mut().unwrap();
    let ciphertext = envelope["aes256gcm"].as_str().unwrap().to_owned();
    let flipped = if ciphertext.ends_with('A') { "B" } else { "A" };
    envelope.insert(
        "aes256gcm".into(),
        json!(format!("{}{flipped}", &ciphertext[..ciphertext.len() - 1])),
    );
    assert!(matches!(
        sealer.unseal_messages(&mut tampered).await,
        Err(VaultError::Unreadable { .. })
    ));
}

pub async fn a_vault_answers_a_ping(harness: &impl Harness) {
    harness.vault(&one_master_key()).await.ping().await.unwrap();
}
