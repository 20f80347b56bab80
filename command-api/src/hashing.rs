//! Password hashing with argon2id, off the async runtime and bounded to the cores.
//!
//! Every hash holds `memory_kib` of memory for tens of milliseconds. Running them on the async
//! workers would stall every other request, and running all that arrive at once would let a
//! burst of logins exhaust memory. So a hash runs on the blocking pool, at most one per core
//! (a semaphore), and at most `max_waiting` more may wait for a core; beyond that the caller is
//! told to come back ([`HashError::Busy`], a 429).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use identity::{Password, PasswordHash};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::settings::PasswordSettings;

/// Why a hash was not computed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("too many password checks are waiting")]
    Busy,
    #[error("password hashing failed: {0}")]
    Failed(String),
}

/// Hashes and verifies passwords; cheap to clone.
#[derive(Clone)]
pub struct Hasher {
    inner: Arc<Inner>,
}

struct Inner {
    params: Params,
    cores: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    /// A hash of a random password with the configured parameters: an unknown email is
    /// verified against it, so it costs what a wrong password costs.
    dummy: PasswordHash,
}

impl Hasher {
    /// Builds the hasher and its dummy hash (one hash's work, at startup).
    pub fn new(settings: &PasswordSettings, max_waiting: usize) -> anyhow::Result<Self> {
        let params = Params::new(
            settings.memory_kib,
            settings.iterations,
            settings.parallelism,
            None,
        )
        .map_err(|error| anyhow::anyhow!("invalid argon2 parameters: {error}"))?;
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let dummy_password = Password::for_verification(uuid::Uuid::new_v4().to_string())
            .map_err(|error| anyhow::anyhow!("making the dummy password: {error}"))?;
        let dummy = hash_now(&params, &dummy_password)?;
        Ok(Self {
            inner: Arc::new(Inner {
                params,
                cores: Arc::new(Semaphore::new(cores)),
                waiting: AtomicUsize::new(0),
                max_waiting,
                dummy,
            }),
        })
    }

    /// A new hash of `password` with the configured parameters.
    pub async fn hash(&self, password: Password) -> Result<PasswordHash, HashError> {
        let params = self.inner.params.clone();
        self.run(move || hash_now(&params, &password).map_err(|e| HashError::Failed(e.to_string())))
            .await?
    }

    /// Whether `password` matches `hash`; with no hash (no such account), the dummy is checked
    /// and the answer is `false`, after the same work.
    pub async fn verify(
        &self,
        password: Password,
        hash: Option<PasswordHash>,
    ) -> Result<bool, HashError> {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.inner.dummy.clone());
        let matches = self.run(move || verify_now(&password, &hash)).await?;
        Ok(known && matches)
    }

    /// Whether `hash` was made with weaker parameters (or another algorithm) than configured.
    pub fn needs_rehash(&self, hash: &PasswordHash) -> bool {
        let Ok(parsed) = argon2::password_hash::PasswordHash::new(hash.as_str()) else {
            return true;
        };
        if parsed.algorithm != Algorithm::Argon2id.ident()
            || parsed.version != Some(Version::V0x13.into())
        {
            return true;
        }
        let Ok(stored) = Params::try_from(&parsed) else {
            return true;
        };
        let wanted = &self.inner.params;
        stored.m_cost() < wanted.m_cost()
            || stored.t_cost() < wanted.t_cost()
            || stored.p_cost() < wanted.p_cost()
    }

    /// Runs `work` on the blocking pool once a core is free, timing it.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let permit = self.acquire().await?;
        let result = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = work();
            metrics::histogram!("password_hash_seconds").record(started.elapsed().as_secs_f64());
            drop(permit);
            result
        })
        .await
        .map_err(|error| HashError::Failed(format!("the hashing task failed: {error}")))?;
        Ok(result)
    }

    async fn acquire(&self) -> Result<OwnedSemaphorePermit, HashError> {
        if let Ok(permit) = self.inner.cores.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let waiting = self.inner.waiting.fetch_add(1, Ordering::SeqCst);
        let _leave = Leave(&self.inner.waiting);
        if waiting >= self.inner.max_waiting {
            return Err(HashError::Busy);
        }
        self.inner
            .cores
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| HashError::Failed("the hashing semaphore was closed".into()))
    }
}

/// Counts a waiter out when it stops waiting, however it stops (even when cancelled).
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn argon2(params: &Params) -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
}

/// Hashes on the current thread: for the blocking pool, startup and the command line.
pub fn hash_now(params: &Params, password: &Password) -> anyhow::Result<PasswordHash> {
    let salt = SaltString::generate(&mut OsRng);
    let phc = argon2(params)
        .hash_password(password.expose().as_bytes(), &salt)
        .map_err(|error| anyhow::anyhow!("hashing a password: {error}"))?
        .to_string();
    PasswordHash::parse(phc).map_err(|error| anyhow::anyhow!("{error}"))
}

/// Verifies with the parameters stored in the hash itself (so old hashes still verify).
pub fn verify_now(password: &Password, hash: &PasswordHash) -> bool {
    let Ok(parsed) = argon2::password_hash::PasswordHash::new(hash.as_str()) else {
        return false;
    };
    Argon2::default()
        .verify_password(password.expose().as_bytes(), &parsed)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> PasswordSettings {
        PasswordSettings {
            memory_kib: 1024,
            iterations: 1,
            ..PasswordSettings::default()
        }
    }

    fn password(text: &str) -> Password {
        Password::for_verification(text.to_owned()).unwrap()
    }

    #[tokio::test]
    async fn a_hash_verifies_its_password_and_no_other() {
        let hasher = Hasher::new(&cheap(), 4).unwrap();
        let hash = hasher.hash(password("correct horse")).await.unwrap();
        assert!(hash.as_str().starts_with("$argon2id$v=19$m=1024,t=1,p=1$"));
        assert!(
            hasher
                .verify(password("correct horse"), Some(hash.clone()))
                .await
                .unwrap()
        );
        assert!(
            !hasher
                .verify(password("wrong horse"), Some(hash))
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn without_a_hash_the_answer_is_no_even_for_the_dummy_password() {
        let hasher = Hasher::new(&cheap(), 4).unwrap();
        assert!(!hasher.verify(password("anything"), None).await.unwrap());
    }

    #[tokio::test]
    async fn a_hash_with_weaker_parameters_needs_a_rehash_and_an_equal_one_does_not() {
        let weak = Hasher::new(&cheap(), 4).unwrap();
        let strong = Hasher::new(
            &PasswordSettings {
                memory_kib: 2048,
                iterations: 2,
                ..PasswordSettings::default()
            },
            4,
        )
        .unwrap();
        let weak_hash = weak.hash(password("correct horse")).await.unwrap();
        let strong_hash = strong.hash(password("correct horse")).await.unwrap();
        assert!(strong.needs_rehash(&weak_hash));
        assert!(!strong.needs_rehash(&strong_hash));
        assert!(!weak.needs_rehash(&strong_hash));
        let bcrypt = PasswordHash::parse("$2b$12$abcdefghijklmnopqrstuv").unwrap();
        assert!(strong.needs_rehash(&bcrypt));
    }

    #[tokio::test]
    async fn beyond_the_waiting_bound_a_hash_is_refused_as_busy() {
        let hasher = Hasher::new(&cheap(), 0).unwrap();
        // Hold every core, so the next hash would have to wait, and none may.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let held = hasher
            .inner
            .cores
            .clone()
            .acquire_many_owned(cores as u32)
            .await
            .unwrap();
        let refused = hasher.hash(password("correct horse")).await;
        assert!(matches!(refused, Err(HashError::Busy)));
        drop(held);
        assert!(hasher.hash(password("correct horse")).await.is_ok());
        assert_eq!(hasher.inner.waiting.load(Ordering::SeqCst), 0);
    }
}
