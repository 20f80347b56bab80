//! Password hashing with argon2id, off the async runtime and bounded to the cores.
//!
//! Every hash holds `memory_kib` of memory for tens of milliseconds. Running them on the async
//! workers would stall every other request, and running all that arrive at once would let a
//! burst of logins exhaust memory. So a hash runs on one of a fixed set of threads, one per
//! core unless `login.hashing_threads` says otherwise (a semaphore hands out the threads), and
//! at most `max_waiting` more may wait for one; beyond that the caller is told to come back
//! ([`HashError::Busy`], a 429).
//!
//! A check against a hash made before the parameters were raised runs faster than one against
//! a hash of today's parameters, such as the dummy hash an unknown email is checked against. So
//! every check also says how much sooner than a check at today's parameters it ended
//! ([`Verified::shortfall`], from the median of the recent ones), and a caller that must not
//! show which hash it checked waits that much longer.
//!
//! The threads are the service's own rather than the runtime's blocking pool: the allocator
//! keeps a freed hash's memory in the arena of the thread that used it, so a blocking pool that
//! grows to dozens of threads under a burst ends up holding a hash's memory in each of them
//! (hundreds of MiB), while a thread per core holds one each.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, ParamsString, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
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

/// The outcome of a password check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub matches: bool,
    /// How much sooner than a check at the configured parameters this one ended: zero for a hash
    /// of today's parameters, more for an older, weaker one.
    pub shortfall: Duration,
}

/// Hashes and verifies passwords; cheap to clone.
#[derive(Clone)]
pub struct Hasher {
    inner: Arc<Inner>,
}

/// Work for a hashing thread, given the thread's working memory.
type Job = Box<dyn FnOnce(&mut Memory) + Send>;

/// The working memory of a hash (`memory_kib` blocks of 1 KiB), kept by each hashing thread
/// from one hash to the next instead of being allocated for each: freeing and allocating tens
/// of MiB between small allocations fragments the allocator's arenas until each holds several
/// hashes' worth.
#[derive(Default)]
pub struct Memory(Vec<Block>);

impl Memory {
    fn blocks(&mut self, params: &Params) -> &mut [Block] {
        let count = params.block_count();
        if self.0.len() < count {
            self.0.resize(count, Block::default());
        }
        &mut self.0[..count]
    }
}

struct Inner {
    params: Params,
    /// One permit per hashing thread.
    threads: Arc<Semaphore>,
    /// To the hashing threads; they stop when the hasher is dropped.
    jobs: std::sync::mpsc::Sender<Job>,
    waiting: AtomicUsize,
    max_waiting: usize,
    /// A hash of a random password with the configured parameters: an unknown email is
    /// verified against it, so it costs what a wrong password costs.
    dummy: PasswordHash,
    /// How long hashes and checks at the configured parameters took lately, once they had a core.
    recent: Mutex<RecentCosts>,
}

/// The last few durations of hashes at the configured parameters; their median is what a check
/// at those parameters takes now, on this machine under its present load.
struct RecentCosts(VecDeque<Duration>);

impl RecentCosts {
    const KEPT: usize = 15;

    fn record(&mut self, took: Duration) {
        if self.0.len() == Self::KEPT {
            self.0.pop_front();
        }
        self.0.push_back(took);
    }

    fn median(&self) -> Duration {
        let mut sorted: Vec<Duration> = self.0.iter().copied().collect();
        sorted.sort();
        sorted.get(sorted.len() / 2).copied().unwrap_or_default()
    }
}

impl Hasher {
    /// Builds the hasher, its `threads` hashing threads and its dummy hash (one hash's work,
    /// at startup).
    pub fn new(
        settings: &PasswordSettings,
        threads: usize,
        max_waiting: usize,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(threads > 0, "login.hashing_threads must be at least 1");
        // What a replica can do is its hashing threads' work: said at start, and on /metrics
        // for the capacity model (docs/capacity.md).
        tracing::info!(threads, "hashing passwords on {threads} threads");
        metrics::gauge!("login_hashing_threads").set(threads as f64);
        let params = Params::new(
            settings.memory_kib,
            settings.iterations,
            settings.parallelism,
            None,
        )
        .map_err(|error| anyhow::anyhow!("invalid argon2 parameters: {error}"))?;
        let dummy_password = Password::for_verification(uuid::Uuid::new_v4().to_string())
            .map_err(|error| anyhow::anyhow!("making the dummy password: {error}"))?;
        let started = Instant::now();
        let dummy = hash_now(&params, &dummy_password, &mut Memory::default())?;
        let mut recent = RecentCosts(VecDeque::with_capacity(RecentCosts::KEPT));
        recent.record(started.elapsed());
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for n in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("password-hash-{n}"))
                .spawn(move || {
                    let mut memory = Memory::default();
                    loop {
                        // The lock is held only to take a job, not to run it.
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&mut memory),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                params,
                threads: Arc::new(Semaphore::new(threads)),
                jobs,
                waiting: AtomicUsize::new(0),
                max_waiting,
                dummy,
                recent: Mutex::new(recent),
            }),
        })
    }

    /// A new hash of `password` with the configured parameters.
    pub async fn hash(&self, password: Password) -> Result<PasswordHash, HashError> {
        let params = self.inner.params.clone();
        let (hashed, took) = self
            .run(move |memory| {
                hash_now(&params, &password, memory).map_err(|e| HashError::Failed(e.to_string()))
            })
            .await?;
        self.recent().record(took);
        hashed
    }

    /// Whether `password` matches `hash`; with no hash (no such account), the dummy is checked
    /// and the answer is `false`, after the same work.
    pub async fn verify(
        &self,
        password: Password,
        hash: Option<PasswordHash>,
    ) -> Result<Verified, HashError> {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.inner.dummy.clone());
        let configured = self.stored_params(&hash).is_some_and(|(_, stored)| {
            let wanted = &self.inner.params;
            (stored.m_cost(), stored.t_cost(), stored.p_cost())
                == (wanted.m_cost(), wanted.t_cost(), wanted.p_cost())
        });
        let (matches, took) = self
            .run(move |memory| verify_now(&password, &hash, memory))
            .await?;
        let shortfall = if configured {
            self.recent().record(took);
            Duration::ZERO
        } else {
            self.recent().median().saturating_sub(took)
        };
        Ok(Verified {
            matches: known && matches,
            shortfall,
        })
    }

    /// Whether `hash` was made with weaker parameters (or another algorithm) than configured.
    pub fn needs_rehash(&self, hash: &PasswordHash) -> bool {
        let Some((true, stored)) = self.stored_params(hash) else {
            return true;
        };
        let wanted = &self.inner.params;
        stored.m_cost() < wanted.m_cost()
            || stored.t_cost() < wanted.t_cost()
            || stored.p_cost() < wanted.p_cost()
    }

    /// The argon2 parameters a hash was made with, and whether it is argon2id version 0x13, the
    /// algorithm this hasher makes; `None` when it is no argon2 hash.
    fn stored_params(&self, hash: &PasswordHash) -> Option<(bool, Params)> {
        let parsed = argon2::password_hash::PasswordHash::new(hash.as_str()).ok()?;
        let ours = parsed.algorithm == Algorithm::Argon2id.ident()
            && parsed.version == Some(Version::V0x13.into());
        let params = Params::try_from(&parsed).ok()?;
        Some((ours, params))
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, RecentCosts> {
        // The costs are plain numbers: one left half-written by a panic is still a number.
        self.inner
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `work` on a hashing thread once one is free; answers how long it took from then.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Memory) -> T + Send + 'static,
    ) -> Result<(T, Duration), HashError> {
        let permit = self.acquire().await?;
        // From a thread being free to the answer: what a caller waits, less the wait for one.
        let dispatched = Instant::now();
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |memory| {
            let started = Instant::now();
            // A panic is the caller's error, not the end of the thread.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || work(memory)));
            metrics::histogram!("password_hash_seconds").record(started.elapsed().as_secs_f64());
            drop(permit);
            let _ = answer.send(result);
        });
        self.inner
            .jobs
            .send(job)
            .map_err(|_| HashError::Failed("the hashing threads have stopped".into()))?;
        match answered.await {
            Ok(Ok(result)) => Ok((result, dispatched.elapsed())),
            Ok(Err(_)) => Err(HashError::Failed("the password hash panicked".into())),
            Err(_) => Err(HashError::Failed("the hashing thread went away".into())),
        }
    }

    async fn acquire(&self) -> Result<OwnedSemaphorePermit, HashError> {
        if let Ok(permit) = self.inner.threads.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let waiting = self.inner.waiting.fetch_add(1, Ordering::SeqCst);
        let _leave = Leave(&self.inner.waiting);
        if waiting >= self.inner.max_waiting {
            return Err(HashError::Busy);
        }
        self.inner
            .threads
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

/// Hashes on the current thread, in `memory`: for the hashing threads, startup and the command
/// line.
pub fn hash_now(
    params: &Params,
    password: &Password,
    memory: &mut Memory,
) -> anyhow::Result<PasswordHash> {
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_buffer = [0u8; 64];
    let salt_bytes = salt
        .as_salt()
        .decode_b64(&mut salt_buffer)
        .map_err(|error| anyhow::anyhow!("decoding a new salt: {error}"))?;
    let length = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let mut output = vec![0u8; length];
    argon2(params)
        .hash_password_into_with_memory(
            password.expose().as_bytes(),
            salt_bytes,
            &mut output,
            memory.blocks(params),
        )
        .map_err(|error| anyhow::anyhow!("hashing a password: {error}"))?;
    let phc = argon2::password_hash::PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(params)
            .map_err(|error| anyhow::anyhow!("encoding the parameters: {error}"))?,
        salt: Some(salt.as_salt()),
        hash: Some(
            Output::new(&output).map_err(|error| anyhow::anyhow!("the hash output: {error}"))?,
        ),
    }
    .to_string();
    PasswordHash::parse(phc).map_err(|error| anyhow::anyhow!("{error}"))
}

/// Verifies with the algorithm and parameters stored in the hash itself (so old hashes still
/// verify), in `memory`. The comparison of the outputs takes constant time.
pub fn verify_now(password: &Password, hash: &PasswordHash, memory: &mut Memory) -> bool {
    let Ok(parsed) = argon2::password_hash::PasswordHash::new(hash.as_str()) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let (Ok(algorithm), Ok(params)) = (
        Algorithm::try_from(parsed.algorithm),
        Params::try_from(&parsed),
    ) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(version)) => version,
        Some(Err(_)) => return false,
    };
    let mut salt_buffer = [0u8; 64];
    let Ok(salt_bytes) = salt.decode_b64(&mut salt_buffer) else {
        return false;
    };
    let mut output = vec![0u8; expected.len()];
    let computed = Argon2::new(algorithm, version, params.clone()).hash_password_into_with_memory(
        password.expose().as_bytes(),
        salt_bytes,
        &mut output,
        memory.blocks(&params),
    );
    computed.is_ok() && Output::new(&output).is_ok_and(|output| output == expected)
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

    async fn matches(hasher: &Hasher, text: &str, hash: Option<PasswordHash>) -> bool {
        hasher.verify(password(text), hash).await.unwrap().matches
    }

    #[tokio::test]
    async fn a_hash_verifies_its_password_and_no_other() {
        let hasher = Hasher::new(&cheap(), 2, 4).unwrap();
        let hash = hasher.hash(password("correct horse")).await.unwrap();
        assert!(hash.as_str().starts_with("$argon2id$v=19$m=1024,t=1,p=1$"));
        assert!(matches(&hasher, "correct horse", Some(hash.clone())).await);
        assert!(!matches(&hasher, "wrong horse", Some(hash)).await);
    }

    #[tokio::test]
    async fn without_a_hash_the_answer_is_no_even_for_the_dummy_password() {
        let hasher = Hasher::new(&cheap(), 2, 4).unwrap();
        assert!(!matches(&hasher, "anything", None).await);
    }

    #[tokio::test]
    async fn a_hash_with_weaker_parameters_needs_a_rehash_and_an_equal_one_does_not() {
        let weak = Hasher::new(&cheap(), 2, 4).unwrap();
        let strong = Hasher::new(
            &PasswordSettings {
                memory_kib: 2048,
                iterations: 2,
                ..PasswordSettings::default()
            },
            2,
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
    async fn a_check_of_an_older_weaker_hash_says_how_much_sooner_it_ended_than_one_of_today() {
        let weak = Hasher::new(&cheap(), 2, 4).unwrap();
        let strong = Hasher::new(
            &PasswordSettings {
                memory_kib: 8 * 1024,
                iterations: 4,
                ..PasswordSettings::default()
            },
            2,
            4,
        )
        .unwrap();
        let old_hash = weak.hash(password("correct horse")).await.unwrap();
        let new_hash = strong.hash(password("correct horse")).await.unwrap();
        for _ in 0..3 {
            strong.verify(password("warm up"), None).await.unwrap();
        }
        let typical = strong.recent().median();

        // The weak hash takes about a thirtieth of the strong one's time. A loaded machine can
        // stall any one check for as long as a strong one takes, so the largest of a few
        // shortfalls decides.
        let mut largest = Duration::ZERO;
        for _ in 0..5 {
            let old = strong
                .verify(password("wrong horse"), Some(old_hash.clone()))
                .await
                .unwrap();
            assert!(!old.matches);
            assert!(old.shortfall <= typical, "{old:?} against {typical:?}");
            largest = largest.max(old.shortfall);
        }
        assert!(largest > typical / 2, "{largest:?} against {typical:?}");
        let new = strong
            .verify(password("wrong horse"), Some(new_hash))
            .await
            .unwrap();
        assert_eq!(new.shortfall, Duration::ZERO);
        let unknown = strong.verify(password("wrong horse"), None).await.unwrap();
        assert_eq!(unknown.shortfall, Duration::ZERO);
        // And the right password on the old hash still matches.
        let right = strong
            .verify(password("correct horse"), Some(old_hash))
            .await
            .unwrap();
        assert!(right.matches);
    }

    #[tokio::test]
    async fn as_many_hashes_run_at_once_as_there_are_hashing_threads_whatever_the_cores() {
        // More threads than this machine may have cores, and fewer than others have.
        const THREADS: usize = 3;
        let hasher = Hasher::new(&cheap(), THREADS, 0).unwrap();
        let (started, mut running) = tokio::sync::mpsc::unbounded_channel();
        let release = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let jobs: Vec<_> = (0..THREADS)
            .map(|_| {
                let (hasher, started, release) = (hasher.clone(), started.clone(), release.clone());
                tokio::spawn(async move {
                    hasher
                        .run(move |_| {
                            let _ = started.send(());
                            // Held until the test has seen them all run; never for good.
                            let (released, wake) = &*release;
                            let guard = released.lock().unwrap();
                            let _ = wake
                                .wait_timeout_while(guard, Duration::from_secs(10), |r| !*r)
                                .unwrap();
                        })
                        .await
                        .map(|_| ())
                })
            })
            .collect();
        for n in 0..THREADS {
            let seen = tokio::time::timeout(Duration::from_secs(5), running.recv()).await;
            assert!(
                matches!(seen, Ok(Some(()))),
                "only {n} of {THREADS} hashes ran at once"
            );
        }
        // Every thread is taken, and none may wait.
        assert!(matches!(
            hasher.hash(password("correct horse")).await,
            Err(HashError::Busy)
        ));
        *release.0.lock().unwrap() = true;
        release.1.notify_all();
        for job in jobs {
            job.await.unwrap().unwrap();
        }
    }

    #[test]
    fn a_hasher_without_threads_is_refused() {
        assert!(Hasher::new(&cheap(), 0, 4).is_err());
    }

    #[tokio::test]
    async fn beyond_the_waiting_bound_a_hash_is_refused_as_busy() {
        let hasher = Hasher::new(&cheap(), 3, 0).unwrap();
        // Hold every thread, so the next hash would have to wait, and none may.
        let held = hasher
            .inner
            .threads
            .clone()
            .acquire_many_owned(3)
            .await
            .unwrap();
        let refused = hasher.hash(password("correct horse")).await;
        assert!(matches!(refused, Err(HashError::Busy)));
        drop(held);
        assert!(hasher.hash(password("correct horse")).await.is_ok());
        assert_eq!(hasher.inner.waiting.load(Ordering::SeqCst), 0);
    }
}
