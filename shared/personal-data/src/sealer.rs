//! What the services hold: the vault and the lookup key, opened from the `personal_data`
//! settings ([`PersonalData::open`]), and the [`Sealer`] that seals the personal fields of the
//! events a command writes and opens those of the messages a reader reads.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use message_store::RecordedMessage;
use platform::settings::PersonalDataSettings;
use serde_json::Value;
use uuid::Uuid;

use crate::{
    Fields, KeyError, KeyVault, LookupKey, MasterKey, MasterKeys, PersonKey, VaultError,
    is_envelope, seal_fields, sealed_persons, sealed_persons_of, unseal_fields, unseal_fields_of,
};

/// The vault and the lookup key, as every binary opens them.
#[derive(Clone)]
pub struct PersonalData {
    pub sealer: Sealer,
    pub lookup_key: Arc<LookupKey>,
}

impl PersonalData {
    /// Opens the vault in the message store's database at `database_url` with the keys the
    /// settings name: each from its setting, else from its file (made on first start when
    /// `create_keys_if_missing`).
    pub async fn open(
        database_url: &str,
        settings: &PersonalDataSettings,
        max_connections: u32,
    ) -> Result<Self, VaultError> {
        let master_keys = master_keys(settings)?;
        let lookup_key = lookup_key(settings)?;
        let vault = crate::connect(database_url, master_keys, max_connections).await?;
        Ok(Self {
            sealer: Sealer::new(vault),
            lookup_key: Arc::new(lookup_key),
        })
    }

    pub fn vault(&self) -> &Arc<dyn KeyVault> {
        self.sealer.vault()
    }
}

/// The master keys the settings name: the current one (`master_key`, else `master_key_file`)
/// and the retired ones.
pub fn master_keys(settings: &PersonalDataSettings) -> Result<MasterKeys, KeyError> {
    let id = settings.master_key_id.as_str();
    let current = match (&settings.master_key, &settings.master_key_file) {
        (Some(hex), _) => MasterKey::from_hex(id, hex)?,
        (None, Some(path)) => MasterKey::from_hex(
            id,
            &read_or_create(path, settings, || {
                MasterKey::generate(id).map(|key| key.to_hex().expose_secret().clone())
            })?,
        )?,
        (None, None) => return Err(KeyError::Missing("personal_data.master_key")),
    };
    let retired = match &settings.retired_master_keys {
        Some(list) => MasterKey::parse_list(list)?,
        None => Vec::new(),
    };
    MasterKeys::new(current, retired)
}

/// The lookup key the settings name (`lookup_key`, else `lookup_key_file`).
pub fn lookup_key(settings: &PersonalDataSettings) -> Result<LookupKey, KeyError> {
    match (&settings.lookup_key, &settings.lookup_key_file) {
        (Some(hex), _) => LookupKey::from_hex(hex),
        (None, Some(path)) => LookupKey::from_hex(&read_or_create(path, settings, || {
            LookupKey::generate().map(|key| key.to_hex().expose_secret().clone())
        })?),
        (None, None) => Err(KeyError::Missing("personal_data.lookup_key")),
    }
}

/// The key file's hexadecimal text; made from `generate` (mode 0600) when it does not exist
/// and the settings allow it.
fn read_or_create(
    path: &Path,
    settings: &PersonalDataSettings,
    generate: impl FnOnce() -> Result<String, KeyError>,
) -> Result<String, KeyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(error)
            if error.kind() == std::io::ErrorKind::NotFound && settings.create_keys_if_missing =>
        {
            let hex = generate()?;
            write_new(path, &hex)?;
            Ok(hex)
        }
        Err(error) => Err(KeyError::File {
            path: path.to_owned(),
            source: error,
        }),
    }
}

fn write_new(path: &Path, hex: &str) -> Result<(), KeyError> {
    use std::io::Write;
    let file_error = |source| KeyError::File {
        path: path.to_owned(),
        source,
    };
    if let Some(directory) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(directory).map_err(file_error)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(file_error)?;
    file.write_all(format!("{hex}\n").as_bytes())
        .map_err(file_error)
}

/// Seals and opens the personal fields of messages with the keys of the vault.
#[derive(Clone)]
pub struct Sealer {
    vault: Arc<dyn KeyVault>,
}

impl Sealer {
    pub fn new(vault: Arc<dyn KeyVault>) -> Self {
        Self { vault }
    }

    pub fn vault(&self) -> &Arc<dyn KeyVault> {
        &self.vault
    }

    /// `person`'s key, to seal the events of one command with one read of the vault.
    /// [`VaultError::Erased`] once the person is erased.
    pub async fn key_for_writing(&self, person: Uuid) -> Result<PersonKey, VaultError> {
        self.vault.key_for_writing(person).await
    }

    /// Seals `fields` of `data` with `person`'s key; reads no key when there are no fields.
    pub async fn seal(
        &self,
        person: Uuid,
        fields: &[&str],
        data: &mut Value,
    ) -> Result<(), VaultError> {
        if fields.is_empty() {
            return Ok(());
        }
        let key = self.key_for_writing(person).await?;
        seal_fields(&key, person, data, fields);
        Ok(())
    }

    /// Opens every sealed field of `messages` in place, with one read of the vault for all the
    /// persons they name; the fields of an erased person become null (so they decode as
    /// erased). Messages without sealed fields cost nothing.
    pub async fn unseal_messages(
        &self,
        messages: &mut [RecordedMessage],
    ) -> Result<(), VaultError> {
        self.unseal_messages_of(messages, Fields::Every).await
    }

    /// [`Self::unseal_messages`] for `fields` only: the other sealed fields become null
    /// unopened, and their persons' keys are not read for them.
    pub async fn unseal_messages_of(
        &self,
        messages: &mut [RecordedMessage],
        fields: Fields<'_>,
    ) -> Result<(), VaultError> {
        if !messages.iter().any(|message| has_envelope(&message.data)) {
            return Ok(());
        }
        let mut persons: Vec<Uuid> = messages
            .iter()
            .flat_map(|message| sealed_persons_of(&message.data, fields))
            .collect();
        persons.sort_unstable();
        persons.dedup();
        // Only envelopes of fields left unopened: nothing to read, but they still become null.
        let keys = if persons.is_empty() {
            HashMap::new()
        } else {
            self.vault.keys(&persons).await?
        };
        for message in messages {
            unseal_fields_of(&mut message.data, fields, |person| keys.get(&person)).map_err(
                |error| VaultError::Unreadable {
                    message: message.id.to_string(),
                    reason: error.to_string(),
                },
            )?;
        }
        Ok(())
    }

    /// Opens the sealed fields of one message's data.
    pub async fn unseal(&self, data: &mut Value) -> Result<(), VaultError> {
        let persons = sealed_persons(data);
        if persons.is_empty() {
            return Ok(());
        }
        let keys = self.vault.keys(&persons).await?;
        unseal_fields(data, |person| keys.get(&person)).map_err(|error| {
            VaultError::Unreadable {
                message: "a message".into(),
                reason: error.to_string(),
            }
        })?;
        Ok(())
    }
}

/// Whether `data` has a sealed top-level field.
fn has_envelope(data: &Value) -> bool {
    data.as_object()
        .is_some_and(|object| object.values().any(is_envelope))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings_in(directory: &Path, create: bool) -> PersonalDataSettings {
        PersonalDataSettings {
            master_key_file: Some(directory.join("keys/master-key")),
            lookup_key_file: Some(directory.join("keys/lookup-key")),
            create_keys_if_missing: create,
            ..PersonalDataSettings::default()
        }
    }

    fn temporary_directory() -> std::path::PathBuf {
        let directory = std::env::temp_dir().join(format!("personal-data-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&directory).unwrap();
        directory
    }

    #[test]
    fn key_files_are_made_once_private_and_read_back_the_same() {
        let directory = temporary_directory();
        let settings = settings_in(&directory, true);
        let (master, lookup) = (
            master_keys(&settings).unwrap(),
            lookup_key(&settings).unwrap(),
        );
        let (master_again, lookup_again) = (
            master_keys(&settings).unwrap(),
            lookup_key(&settings).unwrap(),
        );
        assert_eq!(
            master.current().to_hex().expose_secret(),
            master_again.current().to_hex().expose_secret()
        );
        assert_eq!(lookup.digest("ann"), lookup_again.digest("ann"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(directory.join("keys/master-key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(directory).unwrap();
    }

    #[test]
    fn without_a_key_or_leave_to_make_one_the_settings_are_refused() {
        let directory = temporary_directory();
        assert!(matches!(
            master_keys(&settings_in(&directory, false)),
            Err(KeyError::File { .. })
        ));
        assert!(matches!(
            lookup_key(&PersonalDataSettings::default()),
            Err(KeyError::Missing("personal_data.lookup_key"))
        ));
        std::fs::remove_dir_all(directory).unwrap();
    }

    #[test]
    fn a_retired_key_is_read_beside_the_current_one_and_an_id_used_twice_is_refused() {
        let hex = |byte: &str| byte.repeat(32);
        let settings = PersonalDataSettings {
            master_key_id: "2".into(),
            master_key: Some(hex("22")),
            retired_master_keys: Some(format!("1:{}", hex("11"))),
            ..PersonalDataSettings::default()
        };
        let keys = master_keys(&settings).unwrap();
        assert_eq!(keys.current().id(), "2");
        assert!(keys.get("1").is_some());
        let same_id = PersonalDataSettings {
            retired_master_keys: Some(format!("2:{}", hex("11"))),
            ..settings
        };
        assert!(matches!(
            master_keys(&same_id),
            Err(KeyError::DuplicateMasterKeyId(_))
        ));
    }
}
