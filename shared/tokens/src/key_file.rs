//! The standalone mode's key files, for the signing key and the keys secrets are derived with: made on
//! first start, read on every later one.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use crate::algorithm::Algorithm;
use crate::derivation_key::{DerivationKey, KeyPurpose};
use crate::keys::{KeyError, SigningKey};
use crate::secret::Secret;

/// What the errors about one kind of key file say it was doing.
struct KeyFile {
    reading: &'static str,
    making_directory: &'static str,
    writing: &'static str,
}

const SIGNING_KEY: KeyFile = KeyFile {
    reading: "reading the signing key at",
    making_directory: "creating the directory of the signing key",
    writing: "writing the signing key to",
};

impl SigningKey {
    /// Reads the PKCS#8 PEM at `path`, or, if there is no file, generates a key and writes it
    /// there, readable by its owner only (0600, in directories made 0700).
    ///
    /// An existing file wins: `algorithm` only chooses the kind of a new key, so changing the
    /// setting never silently replaces a key whose tokens are still live. The file appears
    /// complete or not at all (written aside, then linked into place), and if two processes
    /// start at once both end up with the key that was linked first.
    pub fn load_or_create(path: &Path, algorithm: Algorithm) -> Result<SigningKey, KeyError> {
        load_or_create(path, &SIGNING_KEY, SigningKey::from_pem, || {
            let key = SigningKey::generate(algorithm)?;
            let pem = key.to_pem()?;
            Ok((key, pem))
        })
    }
}

impl<P: KeyPurpose> DerivationKey<P> {
    /// The messages of this key's file errors.
    const FILE: KeyFile = KeyFile {
        reading: P::READING,
        making_directory: P::MAKING_DIRECTORY,
        writing: P::WRITING,
    };

    /// Reads the hexadecimal key at `path`, or, if there is no file, generates one and writes
    /// it there, as [`SigningKey::load_or_create`] does (owner only, complete or not at all,
    /// the first of two racing processes wins).
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        load_or_create(path, &Self::FILE, Self::from_hex, || {
            let key = Self::generate()?;
            let hex = key.to_hex();
            Ok((key, hex))
        })
    }

    /// Reads the hexadecimal key at `path`.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        read_key(path, &Self::FILE, Self::from_hex)
    }
}

/// The key at `path` read with `parse`, or a new one from `create` (the key and its file's
/// text) written there.
fn load_or_create<K>(
    path: &Path,
    file: &KeyFile,
    parse: impl Fn(&str) -> Result<K, KeyError>,
    create: impl FnOnce() -> Result<(K, Secret<String>), KeyError>,
) -> Result<K, KeyError> {
    match read_key(path, file, &parse) {
        Err(KeyError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
        found => return found,
    }
    let (key, text) = create()?;
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        create_private_dir(parent).map_err(|source| KeyError::Io {
            action: file.making_directory,
            path: parent.to_path_buf(),
            source,
        })?;
    }
    match write_new(path, text.expose_secret().as_bytes()) {
        Ok(()) => Ok(key),
        // Another process made the key first: use that one, as every replica must.
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => read_key(path, file, parse),
        Err(source) => Err(KeyError::Io {
            action: file.writing,
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn read_key<K>(
    path: &Path,
    file: &KeyFile,
    parse: impl Fn(&str) -> Result<K, KeyError>,
) -> Result<K, KeyError> {
    let text = fs::read_to_string(path).map_err(|source| KeyError::Io {
        action: file.reading,
        path: path.to_path_buf(),
        source,
    })?;
    let text = Secret::new(text);
    parse(text.expose_secret())
}

/// Writes `contents` to a fresh file beside `path`, then hard-links it to `path`, which fails
/// rather than replacing a file that appeared meanwhile.
fn write_new(path: &Path, contents: &[u8]) -> io::Result<()> {
    let file_name = path.file_name().ok_or(io::ErrorKind::InvalidInput)?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(file_name);
    temporary_name.push(format!(".{}.tmp", uuid::Uuid::new_v4()));
    let temporary = path.with_file_name(temporary_name);

    let written =
        write_private_file(&temporary, contents).and_then(|()| fs::hard_link(&temporary, path));
    let removed = fs::remove_file(&temporary);
    written.and(removed)
}

fn write_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn create_private_dir(path: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path)
}
