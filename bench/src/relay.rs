//! `relay`: integration events delivered to NATS JetStream from the store by the JetStream
//! relay, against publishing the same events straight with async-nats in the same run; and, at
//! a steady moderate append rate, the time from an append's commit to JetStream's
//! acknowledgement of its event.
//!
//! The events are account registrations, their addresses sealed as the command side writes them
//! (ADR 13). The relay reads them from its checkpoint, opens them with the vault (one key query
//! per batch), makes each integration event, publishes each batch pipelined with `Nats-Msg-Id`
//! and awaits the acknowledgements, and moves its checkpoint, as in the aggregator process. The
//! baseline publishes the very same payloads (made once from the store beforehand) with
//! async-nats alone: the same subjects, `Nats-Msg-Id`, batches of the same size sent pipelined
//! and their acknowledgements awaited in order, into a stream configured as the relay's: the
//! server's and the client's limit, and nothing else. Baseline and relay run in turn for
//! `--rounds` rounds, each into fresh streams (the relay reset to the start of the store), and
//! the figures are the medians: a machine that slows down for a while hits both alike.
//!
//! The lag: registrations appended one at a time at `--rate` per second while the relay runs as
//! in the aggregator (woken by the store's subscription); each one's lag is from its append
//! returning to the relay's acknowledged position passing it.
//!
//! NATS is the server the tests use (`test_support::NatsServer`: 127.0.0.1:4222 with
//! JetStream, else one started from the local `nats-server`); the streams are deleted at the
//! end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregator::jetstream::{JETSTREAM, JETSTREAM_VERSION, JetStream, NatsSettings};
use aggregator::{Relay, RelayOptions, RelayOutcome};
use async_nats::jetstream::message::PublishMessage;
use identity::{AccountStatus, Email, PasswordHash, Role, UserEvent, UserId, UserRegistered};
use integration::{IntegrationEvent, Published};
use message_store::{ExpectedVersion, MessageStore, NewMessage, StreamAppend, StreamName};
use personal_data::Sealer;
use serde_json::json;
use test_support::bulk::{BulkUsers, PASSWORD_HASH, write_sealed_user_events};
use test_support::{NatsServer, TestDatabase};
use uuid::Uuid;

#[derive(clap::Args)]
pub struct Options {
    /// Events the relay delivers from the store; the baseline publishes as many.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Messages per read of the relay, and events per pipelined batch of both.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Appends per second while the lag is measured.
    #[arg(long, default_value_t = 300)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds of the baseline and the relay in turn; the figures are their medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

const SOURCE: &str = "/identity-bench";

pub async fn run(options: Options) -> anyhow::Result<()> {
    let nats = NatsServer::shared().await;
    let database = TestDatabase::new().await;
    let (store, read_model) = crate::setup::store_and_read_model(&database).await?;
    let sealer = crate::setup::sealer(&database).await?;
    let pool = database.pool().await;
    let bulk = BulkUsers {
        seed: "relay",
        users: i64::try_from(options.events)?,
        login_rounds: 0,
        uneven_logins: false,
        password_hash: PASSWORD_HASH,
    };
    write_sealed_user_events(&pool, &bulk, &sealer).await?;
    // Readable once every transaction that began before it has ended, on the whole server.
    let written = store.last_position().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.head_position().await? < written {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the events did not become readable"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let events = integration_events(&store, &sealer).await?;
    anyhow::ensure!(
        events.len() == options.events,
        "the store makes {} events",
        events.len()
    );

    // Rounds of the baseline and the relay in turn, each into fresh streams: a machine that
    // slows down for a while (these are shared) hits both alike, and the median says it.
    let mut streams = Vec::new();
    let mut rounds = Vec::new();
    let mut relay = None;
    for round in 1..=options.rounds {
        let direct = publish_directly(&nats, &events, options.batch, &mut streams).await?;
        read_model
            .reset_checkpoint(JETSTREAM, JETSTREAM_VERSION)
            .await?;
        let relay_settings = settings(&nats);
        streams.push(relay_settings.clone());
        let mut relaying = Relay::new(
            store.clone(),
            sealer.clone(),
            read_model.clone(),
            JetStream::connect(&relay_settings).await?,
            SOURCE,
            Published::default(),
            RelayOptions {
                batch_size: options.batch,
                ..RelayOptions::default()
            },
        );
        // Connected before the clock starts: as in a running aggregator.
        wait_until_connected(relaying.jetstream().client()).await?;
        let relayed = relay_everything(&mut relaying, options.events).await?;
        println!(
            "round {round}: direct publish {direct:.0} events/s, relay {relayed:.0} events/s, \
             {:.2}x",
            relayed / direct
        );
        rounds.push((direct, relayed));
        relay = Some(relaying);
    }
    let relay = relay.ok_or_else(|| anyhow::anyhow!("no round ran"))?;

    let lags = lag(&store, &sealer, relay, &options).await?;
    let lag = Percentiles::of(lags);

    for settings in &streams {
        let client = async_nats::connect(nats.url()).await?;
        let _ = async_nats::jetstream::new(client)
            .delete_stream(&settings.stream)
            .await;
    }

    let direct = crate::report::median(rounds.iter().map(|(direct, _)| *direct).collect());
    let relay_rate = crate::report::median(rounds.iter().map(|(_, relayed)| *relayed).collect());
    let ratio = crate::report::median(
        rounds
            .iter()
            .map(|(direct, relayed)| relayed / direct)
            .collect(),
    );
    println!(
        "direct publish (async-nats, pipelined batches of {}, Nats-Msg-Id): median {direct:.0} \
         events/s over {} rounds of {} events",
        options.batch,
        rounds.len(),
        events.len()
    );
    println!(
        "relay: median {relay_rate:.0} events/s from {} sealed registrations in the store",
        events.len()
    );
    println!(
        "lag from commit to JetStream's acknowledgement at {}/s for {} s: p50 {:.1} ms, p99 {:.1} \
         ms, max {:.1} ms",
        options.rate, options.seconds, lag.p50, lag.p99, lag.max
    );
    println!(
        "relay: {relay_rate:.0} events/s, {ratio:.2}x direct publish, lag p99 {:.1} ms",
        lag.p99
    );
    Ok(())
}

/// Steps `relay` until it has published `events`: events per second.
async fn relay_everything(relay: &mut Relay, events: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut delivered = 0;
    while delivered < events {
        match relay.process_next_batch().await? {
            RelayOutcome::Published {
                published,
                duplicates,
                ..
            } => {
                anyhow::ensure!(duplicates == 0, "{duplicates} duplicates");
                delivered += published;
            }
            RelayOutcome::Idle => anyhow::bail!("the relay found {delivered} of the events"),
            RelayOutcome::Halted { reason } => anyhow::bail!("the relay halted: {reason}"),
        }
    }
    Ok(rate(delivered, started.elapsed()))
}

/// A stream and subjects of this run's own on `nats`.
fn settings(nats: &NatsServer) -> NatsSettings {
    let tag = Uuid::now_v7().simple().to_string();
    NatsSettings {
        url: Some(nats.url().into()),
        stream: format!("BENCH{tag}"),
        subject_prefix: format!("bench{tag}."),
        ..NatsSettings::default()
    }
}

/// The integration events the store's messages make, as the relay makes them.
async fn integration_events(
    store: &Arc<dyn MessageStore>,
    sealer: &Sealer,
) -> anyhow::Result<Vec<IntegrationEvent>> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let mut messages = store.read_all(after, 1000).await?;
        let Some(last) = messages.last() else {
            return Ok(events);
        };
        after = last.global_position;
        sealer.unseal_messages(&mut messages).await?;
        for message in &messages {
            events.extend(IntegrationEvent::from_message(message, SOURCE)?);
        }
    }
}

async fn wait_until_connected(client: &async_nats::Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.connection_state() != async_nats::connection::State::Connected {
        anyhow::ensure!(Instant::now() < deadline, "NATS did not answer");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Publishes `events` with async-nats alone into a fresh stream configured as the relay's
/// (whose settings are added to `streams`): batches of `batch`, each sent whole and then its
/// acknowledgements awaited in order. Events per second.
async fn publish_directly(
    nats: &NatsServer,
    events: &[IntegrationEvent],
    batch: usize,
    streams: &mut Vec<NatsSettings>,
) -> anyhow::Result<f64> {
    let settings = settings(nats);
    // The relay's stream configuration, as it would create it.
    let config = JetStream::connect(&settings).await?.stream_config().clone();
    streams.push(settings.clone());
    let jetstream = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    jetstream.create_stream(config).await?;
    let payloads: Vec<(String, String, bytes::Bytes)> = events
        .iter()
        .map(|event| {
            (
                format!("{}{}", settings.subject_prefix, event.kind.name()),
                event.id.to_string(),
                event.to_json().into(),
            )
        })
        .collect();
    let started = Instant::now();
    for chunk in payloads.chunks(batch.max(1)) {
        let mut acks = Vec::with_capacity(chunk.len());
        for (subject, id, payload) in chunk {
            let message = PublishMessage::build()
                .message_id(id)
                .payload(payload.clone());
            acks.push(jetstream.send_publish(subject.clone(), message).await?);
        }
        for ack in acks {
            let ack = ack.await?;
            anyhow::ensure!(!ack.duplicate, "a duplicate in a fresh stream");
        }
    }
    Ok(rate(payloads.len(), started.elapsed()))
}

/// Runs `relay` as the aggregator does while registrations are appended at `options.rate` per
/// second; each one's time from its append returning to JetStream's acknowledgement, in
/// milliseconds.
async fn lag(
    store: &Arc<dyn MessageStore>,
    sealer: &Sealer,
    relay: Relay,
    options: &Options,
) -> anyhow::Result<Vec<f64>> {
    let mut acknowledged = relay.acknowledged();
    let mut done = relay.acknowledged();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    // Every move of the acknowledged position, with when it was seen.
    let watching = tokio::spawn(async move {
        let mut moves = Vec::new();
        while acknowledged.changed().await.is_ok() {
            let position = *acknowledged.borrow_and_update();
            moves.push((position, Instant::now()));
        }
        moves
    });

    let hash = PasswordHash::parse(PASSWORD_HASH)?;
    let total = options.rate * options.seconds;
    let mut appended = Vec::with_capacity(usize::try_from(total)?);
    let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / options.rate.max(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..total {
        ticks.tick().await;
        let id = Uuid::now_v7();
        let email = Email::parse(&format!("lag{n}@bench.example"))?;
        let event = UserEvent::UserRegistered(UserRegistered {
            user_id: UserId::from_uuid(id),
            email_normalized: email.normalized().into(),
            email: email.into(),
            password_hash: hash.clone().into(),
            status: AccountStatus::Active,
            roles: vec![Role::User],
            registered_at: chrono::DateTime::UNIX_EPOCH,
        });
        let mut data = event.to_json();
        sealer.seal(id, event.personal_fields(), &mut data).await?;
        let message = NewMessage::new(event.event_type(), data)
            .with_metadata(json!({ identity::EVENT_VERSION_KEY: event.version() }));
        let position = store
            .append(vec![StreamAppend::new(
                StreamName::for_entity("user", id)?,
                ExpectedVersion::NoStream,
                vec![message],
            )])
            .await?
            .last_global_position();
        appended.push((position, Instant::now()));
    }
    let last = appended.last().map_or(0, |(position, _)| *position);
    tokio::time::timeout(
        Duration::from_secs(30),
        done.wait_for(|acked| *acked >= last),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the relay did not publish every appended event"))??;
    let _ = stop.send(());
    running.await?;
    let moves = watching.await?;
    let mut lags = Vec::with_capacity(appended.len());
    for (position, returned) in appended {
        let Some((_, at)) = moves.iter().find(|(acked, _)| *acked >= position) else {
            anyhow::bail!("position {position} was never acknowledged");
        };
        lags.push(at.saturating_duration_since(returned).as_secs_f64() * 1000.0);
    }
    Ok(lags)
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(mut milliseconds: Vec<f64>) -> Self {
        milliseconds.sort_by(f64::total_cmp);
        let at = |p: f64| {
            let index = ((milliseconds.len() as f64 * p) as usize).min(milliseconds.len() - 1);
            milliseconds.get(index).copied().unwrap_or(f64::NAN)
        };
        Self {
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}
