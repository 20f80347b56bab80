//! The standalone mode's key file: created once, private to its owner, read on every start.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokens::{Algorithm, KeyError, RefreshToken, RefreshTokenKey, SigningKey};
use uuid::Uuid;

/// A fresh directory under the system's temporary directory, removed when dropped.
struct TemporaryDirectory(PathBuf);

impl TemporaryDirectory {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("tokens-test-{}", Uuid::new_v4()));
        std::fs::create_dir(&path).unwrap();
        TemporaryDirectory(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TemporaryDirectory {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_first_start_creates_a_key_file_that_only_its_owner_can_read() {
    let directory = TemporaryDirectory::new();
    let path = directory.path().join("state/keys/signing.pem");

    let key = SigningKey::load_or_create(&path, Algorithm::EdDSA).unwrap();

    assert_eq!(key.algorithm(), Algorithm::EdDSA);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&directory.path().join("state/keys")), 0o700);
    let written = std::fs::read_to_string(&path).unwrap();
    assert_eq!(SigningKey::from_pem(&written).unwrap().kid(), key.kid());
    // Nothing else was left beside it (the temporary file is gone).
    let entries = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
    assert_eq!(entries, 1);
}

#[test]
fn a_later_start_reads_the_same_key_whatever_algorithm_is_asked_for() {
    let directory = TemporaryDirectory::new();
    let path = directory.path().join("signing.pem");

    let first = SigningKey::load_or_create(&path, Algorithm::ES256).unwrap();
    let second = SigningKey::load_or_create(&path, Algorithm::ES256).unwrap();
    let third = SigningKey::load_or_create(&path, Algorithm::EdDSA).unwrap();

    assert_eq!(second.kid(), first.kid());
    assert_eq!(third.kid(), first.kid());
    assert_eq!(third.algorithm(), Algorithm::ES256);
}

#[test]
fn a_corrupt_key_file_is_an_error_and_is_left_alone() {
    let directory = TemporaryDirectory::new();
    let path = directory.path().join("signing.pem");
    std::fs::write(&path, "not a key").unwrap();

    assert!(matches!(
        SigningKey::load_or_create(&path, Algorithm::EdDSA),
        Err(KeyError::NotPem)
    ));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a key");
}

#[test]
fn an_unreadable_key_path_names_the_path_in_its_error() {
    let directory = TemporaryDirectory::new();
    // A directory where the file should be.
    let path = directory.path().join("signing.pem");
    std::fs::create_dir(&path).unwrap();

    let error = SigningKey::load_or_create(&path, Algorithm::EdDSA).unwrap_err();
    assert!(matches!(error, KeyError::Io { .. }));
    assert!(error.to_string().contains("signing.pem"), "{error}");
}

#[test]
fn the_first_start_creates_a_refresh_token_key_file_that_only_its_owner_can_read() {
    let directory = TemporaryDirectory::new();
    let path = directory.path().join("state/keys/refresh.key");

    let key = RefreshTokenKey::load_or_create(&path).unwrap();

    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&directory.path().join("state/keys")), 0o700);
    let written = std::fs::read_to_string(&path).unwrap();
    assert_eq!(written.len(), 64);
    assert!(written.bytes().all(|b| b.is_ascii_hexdigit()));
    // A later start, and a reader of the file, hold the same key.
    let nonce = [3; 32];
    let token = RefreshToken::issue(&key, Uuid::new_v4(), 0, &nonce).unwrap();
    for again in [
        RefreshTokenKey::load_or_create(&path).unwrap(),
        RefreshTokenKey::from_file(&path).unwrap(),
    ] {
        assert!(token.authenticates_with(&again, &nonce));
    }
    let entries = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
    assert_eq!(entries, 1);
}

#[test]
fn a_corrupt_refresh_token_key_file_is_an_error_and_is_left_alone() {
    let directory = TemporaryDirectory::new();
    let path = directory.path().join("refresh.key");
    std::fs::write(&path, "not a key").unwrap();

    assert!(matches!(
        RefreshTokenKey::load_or_create(&path),
        Err(KeyError::InvalidDerivationKey("refresh token key"))
    ));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a key");
    let missing = directory.path().join("missing.key");
    let error = RefreshTokenKey::from_file(&missing).unwrap_err();
    assert!(error.to_string().contains("refresh token key"), "{error}");
    assert!(error.to_string().contains("missing.key"), "{error}");
}
