//! The standalone mode's key file: made on first start, read on every later one.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use crate::algorithm::Algorithm;
use crate::keys::{KeyError, SigningKey};

impl SigningKey {
    /// Reads the PKCS#8 PEM at `path`, or, if there is no file, generates a key and writes it
    /// there, readable by its owner only (0600, in directories made 0700).
    ///
    /// An existing file wins: `algorithm` only chooses the kind of a new key, so changing the
    /// setting never silently replaces a key whose tokens are still live. The file appears
    /// complete or not at all (written aside, then linked into place), and if two processes
    /// start at once both end up with the key that was linked first.
    pub fn load_or_create(path: &Path, algorithm: Algorithm) -> Result<SigningKey, KeyError> {
        match read_key(path) {
            Err(KeyError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            found => return found,
        }
        let key = SigningKey::generate(algorithm)?;
        let pem = key.to_pem()?;
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            create_private_dir(parent).map_err(|source| KeyError::Io {
                action: "creating the directory of the signing key",
                path: parent.to_path_buf(),
                source,
            })?;
        }
        match write_new(path, pem.expose_secret().as_bytes()) {
            Ok(()) => Ok(key),
            // Another process made the key first: use that one, as every replica must.
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => read_key(path),
            Err(source) => Err(KeyError::Io {
                action: "writing the signing key to",
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

fn read_key(path: &Path) -> Result<SigningKey, KeyError> {
    let pem = fs::read_to_string(path).map_err(|source| KeyError::Io {
        action: "reading the signing key at",
        path: path.to_path_buf(),
        source,
    })?;
    let pem = crate::Secret::new(pem);
    SigningKey::from_pem(pem.expose_secret())
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
