//! `refresh`: refreshes over HTTP from concurrent clients, each rotating its own session's
//! refresh token, against single-message appends with an expected version from as many
//! writers to the same store.
//!
//! The baseline is what one refresh cannot do without: append one message to a stream after
//! the version it read (here the version each writer remembers, so the baseline reads
//! nothing). A refresh does that and more: it reads the session's last message and the
//! account's stream, derives two HMACs, signs an access token and answers over HTTP. A ratio
//! above 1.0 would mean the baseline is wrong, and the run fails saying so.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use message_store::{ExpectedVersion, MessageStore, NewMessage, StreamAppend, StreamName};
use serde_json::{Value, json};
use test_support::TestDatabase;
use uuid::Uuid;

use crate::report::{median, rate};
use crate::setup::{CommandApi, expect_json};

#[derive(clap::Args)]
pub struct Options {
    /// Concurrent clients, and writers of the baseline.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds per round; rounds alternate between the baseline and the refreshes.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

const PASSWORD: &str = "benchmark password";

pub async fn run(options: Options) -> anyhow::Result<()> {
    let database = TestDatabase::new().await;
    let connections = u32::try_from(options.clients)? + 2;
    let service = CommandApi::start(&database, |settings| {
        settings.database.max_connections = connections;
    })
    .await?;
    let sessions = service.log_in_clients(options.clients).await?;
    let writers = Writers::new(options.clients)?;

    let duration = Duration::from_secs(options.seconds);
    let (mut append_rates, mut refresh_rates) = (Vec::new(), Vec::new());
    for round in 1..=options.rounds {
        let (store, streams) = (service.store.clone(), writers.clone());
        let appended = rate(options.clients, duration, move |writer, _| {
            append_after(store.clone(), streams.clone(), writer)
        })
        .await?;
        let (client, base, held) = (
            service.client.clone(),
            service.base.clone(),
            sessions.clone(),
        );
        let refreshed = rate(options.clients, duration, move |worker, _| {
            refresh(client.clone(), base.clone(), held.clone(), worker)
        })
        .await?;
        println!(
            "round {round}: store append with expected version {appended:.0}/s, refresh over HTTP {refreshed:.0}/s"
        );
        append_rates.push(appended);
        refresh_rates.push(refreshed);
    }
    service.stop().await?;

    let (appended, refreshed) = (median(append_rates), median(refresh_rates));
    println!(
        "store append with expected version: {appended:.0}/s ({} writers)",
        options.clients
    );
    println!(
        "refresh over HTTP: {refreshed:.0}/s ({} clients)",
        options.clients
    );
    let ratio = refreshed / appended;
    println!("refresh: {refreshed:.0}/s, {ratio:.2}x store append");
    anyhow::ensure!(
        ratio <= 1.0,
        "refresh ratio {ratio:.2} above 1.0: the baseline is not the store's limit"
    );
    Ok(())
}

/// What the refresh benchmark does with the command API before it measures.
impl CommandApi {
    /// Registers one account per client and logs each in: each client's refresh token.
    async fn log_in_clients(&self, clients: usize) -> anyhow::Result<HeldTokens> {
        let mut tokens = Vec::with_capacity(clients);
        for client in 0..clients {
            let email = format!("refresh-{client}@example.com");
            let body = json!({ "email": email, "password": PASSWORD });
            let request = self.client.post(format!("{}/users", self.base)).json(&body);
            expect_json(request, 201, "registering").await?;
            let request = self.client.post(format!("{}/login", self.base)).json(&body);
            let answer = expect_json(request, 200, "logging in").await?;
            tokens.push(Mutex::new(refresh_token_of(&answer)?));
        }
        Ok(Arc::new(tokens))
    }
}

/// Each client's current refresh token.
type HeldTokens = Arc<Vec<Mutex<String>>>;

/// One refresh of client `worker`'s session, which must rotate: the answer's token replaces
/// the held one.
async fn refresh(
    client: reqwest::Client,
    base: String,
    held: HeldTokens,
    worker: usize,
) -> anyhow::Result<()> {
    let slot = held
        .get(worker)
        .ok_or_else(|| anyhow::anyhow!("no session for client {worker}"))?;
    let current = lock(slot).clone();
    let request = client
        .post(format!("{base}/token/refresh"))
        .json(&json!({ "refresh_token": current }));
    let answer = expect_json(request, 200, "refreshing").await?;
    let next = refresh_token_of(&answer)?;
    anyhow::ensure!(next != current, "a refresh answered the token it was given");
    *lock(slot) = next;
    Ok(())
}

fn refresh_token_of(answer: &Value) -> anyhow::Result<String> {
    answer["refresh_token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no refresh_token in {answer}"))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The baseline's writers: each appends to a stream of its own, after the version it wrote
/// last.
#[derive(Clone)]
struct Writers(Arc<Vec<Mutex<(StreamName, ExpectedVersion)>>>);

impl Writers {
    fn new(writers: usize) -> anyhow::Result<Self> {
        Ok(Self(Arc::new(
            (0..writers)
                .map(|_| {
                    let stream = StreamName::for_entity("benchSession", Uuid::new_v4())?;
                    Ok(Mutex::new((stream, ExpectedVersion::NoStream)))
                })
                .collect::<anyhow::Result<_>>()?,
        )))
    }
}

/// One message, about the size of a `SessionRefreshed`, appended to `writer`'s stream at the
/// version it expects.
async fn append_after(
    store: Arc<dyn MessageStore>,
    writers: Writers,
    writer: usize,
) -> anyhow::Result<()> {
    let slot = writers
        .0
        .get(writer)
        .ok_or_else(|| anyhow::anyhow!("no stream for writer {writer}"))?;
    let (stream, expected) = lock(slot).clone();
    let message = NewMessage::new(
        "Benchmarked",
        json!({
            "session_id": Uuid::new_v4(),
            "user_id": Uuid::new_v4(),
            "session_epoch": 0,
            "started_at": "2026-12-01T06:00:00Z",
            "expires_at": "2027-03-01T06:00:00Z",
            "idle_expires_at": "2026-12-15T06:00:00Z",
            "user_agent": "bench/1.0",
            "generation": 1,
            "nonce": "3f9a1c7e5b2d8046a1e9c3b7d5f20864e7a9b1c3d5f7092a4c6e8b0d2f4a6c81",
            "rotated_at": "2026-12-01T06:00:00Z",
            "previous_nonce": "08c2e5f7a91b3d46c8e0f2a4b6d8193e5c7a9b1d3f50628e4a6c8e0b2d4f6a1c",
        }),
    )
    .with_metadata(json!({ "correlation_id": Uuid::new_v4() }));
    let appended = store
        .append(vec![StreamAppend::new(
            stream.clone(),
            expected,
            vec![message],
        )])
        .await?;
    let written = appended
        .messages
        .first()
        .ok_or_else(|| anyhow::anyhow!("an append wrote nothing"))?;
    *lock(slot) = (stream, ExpectedVersion::Exact(written.position));
    Ok(())
}
