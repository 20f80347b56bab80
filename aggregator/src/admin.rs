//! The operator's commands: `status` of every consumer (the users projection, the mailer, the
//! JetStream relay and each webhook endpoint's delivery) and of the personal keys, `reset` of
//! any consumer, and `rebuild` of a projection.

use std::sync::Arc;

use anyhow::{Context, bail};
use message_store::{GlobalPosition, MessageStore};
use personal_data::{KeyVault, MasterKeys, Sealer};
use serde::Serialize;
use sqlx::{Executor, Row};

use crate::consumer::LOCK_KEY_SQL;
use crate::jetstream::{JETSTREAM, JETSTREAM_VERSION};
use crate::mailer::{MAILER, MAILER_VERSION};
use crate::projector::{Outcome, Projector, ProjectorOptions, erase_keys, read_unsealed};
use read_model_schema::{USERS_VERSION, signed};

use crate::read_model::{Checkpoint, Committed, ReadModelWriter, Target, pg_apply};
use crate::view::{Change, prepare};
use crate::webhooks;

/// The consumers this build knows: the projections, then the mailer and the JetStream relay.
pub const PROJECTIONS: &[&str] = &["users", MAILER, JETSTREAM];

/// One projection as `aggregator status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProjectionStatus {
    pub projection: String,
    pub version: Option<i32>,
    pub checkpoint: GlobalPosition,
    pub head: GlobalPosition,
    /// Messages after the checkpoint (a count: positions are sparse).
    pub lag: u64,
    /// The `application_name` of the connection holding the projection's lock, if any.
    pub held_by: Option<String>,
}

fn target(projection: &str) -> anyhow::Result<Target> {
    match projection {
        "users" => Ok(Target::USERS),
        MAILER => bail!("the mailer keeps no view to rebuild; `reset` replays it"),
        JETSTREAM => bail!("the JetStream relay keeps no view to rebuild; `reset` replays it"),
        webhook if webhook.starts_with(webhooks::CONSUMER_PREFIX) => {
            bail!("a webhook endpoint's delivery keeps no view to rebuild; `reset` delivers again")
        }
        other => bail!("no projection named {other:?}; known: {PROJECTIONS:?}"),
    }
}

/// Every consumer's checkpoint, lag and holder: the fixed ones ([`PROJECTIONS`]), then each
/// live webhook endpoint's (`webhook:<id>`; one whose delivery has not started yet shows no
/// version, at 0).
pub async fn status(
    store: &Arc<dyn MessageStore>,
    read_model: &ReadModelWriter,
) -> anyhow::Result<Vec<ProjectionStatus>> {
    let head = store.head_position().await.context("reading the head")?;
    let mut consumers: Vec<String> = PROJECTIONS.iter().map(|name| (*name).to_owned()).collect();
    consumers.extend(
        webhooks::consumer_names(store)
            .await
            .context("reading the webhook endpoints")?,
    );
    let mut statuses = Vec::new();
    for projection in &consumers {
        let checkpoint = read_model
            .checkpoint(projection)
            .await
            .context("reading the checkpoint")?;
        let position = checkpoint.map_or(0, |c| c.position);
        let held_by = match read_model.as_postgres() {
            Some(pool) => lock_holder(pool, projection).await?,
            None => None,
        };
        statuses.push(ProjectionStatus {
            projection: projection.clone(),
            version: checkpoint.map(|c| c.version),
            checkpoint: position,
            head,
            lag: store
                .count_after(position)
                .await
                .context("counting the lag")?,
            held_by,
        });
    }
    Ok(statuses)
}

/// The persons' keys as `aggregator status` shows them (ADR 13, rotation): how many keys each
/// master key wraps, the configured ones first, and how many persons are erased. A retired
/// master key that wraps none can be dropped from the configuration.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PersonalKeysStatus {
    pub master_keys: Vec<MasterKeyStatus>,
    /// Persons erased: their tombstones, which hold no key.
    pub erased: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MasterKeyStatus {
    pub id: String,
    /// `current`, `retired`, or `unknown`: a master key no setting names, whose keys this
    /// process cannot read (a retired key dropped before every key was rewrapped).
    pub role: &'static str,
    /// The persons' keys it wraps.
    pub keys: u64,
}

/// Counts the persons' keys in `vault` by master key, beside the `configured` ones.
pub async fn personal_keys(
    vault: &Arc<dyn KeyVault>,
    configured: &MasterKeys,
) -> anyhow::Result<PersonalKeysStatus> {
    let counts = vault
        .count_by_master_key()
        .await
        .context("counting the persons' keys")?;
    let count_of = |id: &str| {
        counts
            .by_master_key
            .iter()
            .find(|(counted, _)| counted == id)
            .map_or(0, |(_, keys)| *keys)
    };
    let current = configured.current().id();
    let mut master_keys = vec![MasterKeyStatus {
        id: current.to_owned(),
        role: "current",
        keys: count_of(current),
    }];
    for retired in configured.retired() {
        master_keys.push(MasterKeyStatus {
            id: retired.id().to_owned(),
            role: "retired",
            keys: count_of(retired.id()),
        });
    }
    for (id, keys) in &counts.by_master_key {
        if configured.get(id).is_none() {
            master_keys.push(MasterKeyStatus {
                id: id.clone(),
                role: "unknown",
                keys: *keys,
            });
        }
    }
    Ok(PersonalKeysStatus {
        master_keys,
        erased: counts.erased,
    })
}

/// Who holds the projection's advisory lock: the holder's `application_name` and pid.
pub async fn lock_holder(pool: &sqlx::PgPool, projection: &str) -> anyhow::Result<Option<String>> {
    let row = sqlx::query(&format!(
        "SELECT a.pid, a.application_name, a.client_addr::text AS client \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND ((l.classid::bigint << 32) | l.objid::bigint) = {LOCK_KEY_SQL}"
    ))
    .bind(projection)
    .fetch_optional(pool)
    .await
    .context("reading pg_locks")?;
    Ok(row.map(|row| {
        let pid: i32 = row.try_get("pid").unwrap_or_default();
        let name: Option<String> = row.try_get("application_name").ok();
        let client: Option<String> = row.try_get("client").ok().flatten();
        format!(
            "{} (backend pid {pid}{})",
            name.unwrap_or_default(),
            client.map(|c| format!(", from {c}")).unwrap_or_default()
        )
    }))
}

/// Empties the views (users and sessions) and their checkpoint in one transaction; the worker
/// replays from zero. For the mailer, moves its checkpoint back to the start: it sends every
/// mail again (but those whose links have expired), each with the `Message-ID` it had. For the
/// JetStream relay, likewise: it publishes every event again, each with the `Nats-Msg-Id` it
/// had (JetStream drops those within its duplicate window; erased persons' addresses are gone).
///
/// A webhook endpoint's delivery (`webhook:<id>`) is reset by [`reset_consumer`], which finds
/// its registration in the store.
pub async fn reset(read_model: &ReadModelWriter, projection: &str) -> anyhow::Result<()> {
    if projection == MAILER {
        return read_model
            .reset_checkpoint(MAILER, MAILER_VERSION)
            .await
            .context("resetting the mailer");
    }
    if projection == JETSTREAM {
        return read_model
            .reset_checkpoint(JETSTREAM, JETSTREAM_VERSION)
            .await
            .context("resetting the JetStream relay");
    }
    let target = target(projection)?;
    read_model
        .reset(&target, USERS_VERSION)
        .await
        .context("resetting the projection")
}

/// `aggregator reset <name>`: [`reset`] for the fixed consumers; a webhook endpoint's delivery
/// goes back to the endpoint's registration, so that it receives everything since then again,
/// each event with the `webhook-id` it had.
pub async fn reset_consumer(
    store: &Arc<dyn MessageStore>,
    read_model: &ReadModelWriter,
    name: &str,
) -> anyhow::Result<()> {
    if name.starts_with(webhooks::CONSUMER_PREFIX) {
        return webhooks::reset(store, read_model, name)
            .await
            .with_context(|| format!("resetting {name}"));
    }
    reset(read_model, name).await
}

/// Rows a rebuild folds in memory before it writes them with its checkpoint (docs/adr/0005):
/// nobody reads the table being rebuilt, so it trades commit frequency for writing each row
/// once per commit rather than once per event. At a few hundred bytes a row, about 150 MB.
pub const REBUILD_FOLD_ROWS: usize = 500_000;

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    pub events: u64,
    pub position: GlobalPosition,
}

/// Replays every event into fresh tables beside the live ones (`users_rebuild` and
/// `sessions_rebuild`), then swaps each pair in one transaction together with the checkpoint.
/// Readers see the old views until the swap commits and the new ones after it, never a
/// half-built one.
///
/// The swap transaction locks the live checkpoint row (so the live worker's next commit waits,
/// then finds its checkpoint moved and reloads it), replays what the store's readers can see
/// beyond the catch-up (commits still behind the transaction horizon, ADR 2, are left to the
/// live worker, which goes on from the swapped-in checkpoint), and renames. Only PostgreSQL: on
/// SQLite, use `reset`.
///
/// Like the live worker, it opens each batch's personal fields with `sealer`, and deletes the key
/// of an account whose erasure it applies.
pub async fn rebuild(
    store: &Arc<dyn MessageStore>,
    sealer: &Sealer,
    read_model: &ReadModelWriter,
    projection: &str,
    batch_size: usize,
) -> anyhow::Result<Rebuilt> {
    rebuild_with(
        store,
        sealer,
        read_model,
        projection,
        RebuildOptions {
            batch_size,
            fold_rows: REBUILD_FOLD_ROWS,
        },
    )
    .await
}

/// How a rebuild reads and commits.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// Messages per read of the store.
    pub batch_size: usize,
    /// Rows folded in memory before they are written with the rebuild's checkpoint
    /// ([`REBUILD_FOLD_ROWS`]; fewer commit more often, as a test that kills a rebuild between
    /// commits wants).
    pub fold_rows: usize,
}

/// [`rebuild`], with how it reads and commits.
pub async fn rebuild_with(
    store: &Arc<dyn MessageStore>,
    sealer: &Sealer,
    read_model: &ReadModelWriter,
    projection: &str,
    options: RebuildOptions,
) -> anyhow::Result<Rebuilt> {
    let live = target(projection)?;
    let fresh = Target::USERS_REBUILD;
    let Some(pool) = read_model.as_postgres() else {
        bail!("rebuild runs on a PostgreSQL read model; on SQLite use `reset`");
    };
    prepare_fresh_table(pool, &live, &fresh).await?;
    let mut events = catch_up(store, sealer, read_model, &fresh, &options).await?;

    let mut tx = pool.begin().await?;
    // The live worker's next commit waits for this, then finds its checkpoint moved.
    sqlx::query("SELECT position FROM projection_checkpoints WHERE projection = $1 FOR UPDATE")
        .bind(live.checkpoint)
        .fetch_optional(&mut *tx)
        .await?;
    let (stretch, checkpoint) =
        replay_the_last_stretch(store, sealer, &mut tx, &fresh, options.batch_size).await?;
    events += stretch;
    swap_in(&mut tx, &live, &fresh, checkpoint.position).await?;
    tx.commit().await.context("committing the swap")?;
    Ok(Rebuilt {
        events,
        position: checkpoint.position,
    })
}

/// Projects everything the store's readers can see into the fresh table, outside any lock:
/// the bulk of the work, while the live view keeps serving. Returns the events applied.
async fn catch_up(
    store: &Arc<dyn MessageStore>,
    sealer: &Sealer,
    read_model: &ReadModelWriter,
    fresh: &Target,
    options: &RebuildOptions,
) -> anyhow::Result<u64> {
    let mut projector = Projector::new(
        store.clone(),
        sealer.clone(),
        read_model.clone(),
        fresh.clone(),
        ProjectorOptions {
            batch_size: options.batch_size,
            fold_rows: options.fold_rows,
            cache_rows: options.fold_rows.max(REBUILD_FOLD_ROWS),
            ..ProjectorOptions::default()
        },
    );
    let mut events = 0u64;
    loop {
        match projector.process_next_batch().await? {
            Outcome::Applied { events: n, .. } => events += n as u64,
            Outcome::Idle => return Ok(events),
            Outcome::Halted { reason } => bail!("the rebuild halted: {reason}"),
        }
    }
}

/// Inside the swap transaction, with the live checkpoint locked: applies what the store's
/// readers can see beyond the catch-up's checkpoint (what writers appended meanwhile, as far as
/// the transaction horizon lets readers see it: the live worker takes the rest from the
/// swapped-in checkpoint). Returns the events applied and the fresh table's checkpoint.
async fn replay_the_last_stretch(
    store: &Arc<dyn MessageStore>,
    sealer: &Sealer,
    tx: &mut sqlx::PgConnection,
    fresh: &Target,
    batch_size: usize,
) -> anyhow::Result<(u64, Checkpoint)> {
    let mut checkpoint = Checkpoint::from_stored(
        sqlx::query_as(Checkpoint::READ)
            .bind(fresh.checkpoint)
            .fetch_one(&mut *tx)
            .await?,
    );
    let mut events = 0;
    loop {
        let messages = read_unsealed(store, sealer, checkpoint.position, batch_size).await?;
        let Some(last) = messages.last() else {
            return Ok((events, checkpoint));
        };
        let prepared = prepare(&messages);
        if let Some((_, reason)) = prepared.poison {
            bail!("the rebuild halted: {reason}");
        }
        let erased: Vec<_> = prepared.changes.iter().filter_map(Change::erases).collect();
        erase_keys(sealer.vault(), &erased).await?;
        match pg_apply(
            &mut *tx,
            fresh,
            &checkpoint,
            last.global_position,
            &prepared.changes,
        )
        .await?
        {
            Committed::Written { .. } => {}
            Committed::CheckpointMoved => bail!("the rebuild's checkpoint moved under it"),
            Committed::Poison { reason, .. } => bail!("the rebuild halted: {reason}"),
        }
        events += prepared.changes.len() as u64;
        checkpoint = checkpoint.at(last.global_position);
    }
}

/// Replaces the live tables with the fresh ones and moves the live checkpoint to `position`, in
/// the caller's transaction.
async fn swap_in(
    tx: &mut sqlx::PgConnection,
    live: &Target,
    fresh: &Target,
    position: GlobalPosition,
) -> anyhow::Result<()> {
    for (live, fresh) in live.tables().into_iter().zip(fresh.tables()) {
        // The names the migrations gave the live indexes, for the fresh indexes built alike
        // (`LIKE ... INCLUDING ALL` names them after their columns instead).
        let names: Vec<(String, String)> = sqlx::query_as(INDEXES_BUILT_ALIKE)
            .bind(fresh)
            .bind(live)
            .fetch_all(&mut *tx)
            .await?;
        // Several statements in one round trip: they take no parameters (`Target` fixes the
        // names).
        let replace = format!("DROP TABLE {live}; ALTER TABLE {fresh} RENAME TO {live}");
        tx.execute(sqlx::raw_sql(&replace)).await?;
        for (fresh_index, live_index) in names {
            sqlx::query(&format!(
                "ALTER INDEX \"{fresh_index}\" RENAME TO \"{live_index}\""
            ))
            .execute(&mut *tx)
            .await?;
        }
    }
    // The live checkpoint keeps its epoch: the worker holding the projection carries on, from
    // the rebuild's position, if it folds the rebuild's version (the commit compares both).
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, version, position) VALUES ($1, $2, $3) \
         ON CONFLICT (projection) DO UPDATE \
         SET version = excluded.version, position = excluded.position, updated_at = now()",
    )
    .bind(live.checkpoint)
    .bind(USERS_VERSION)
    .bind(signed(position))
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1")
        .bind(fresh.checkpoint)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The indexes of table `$1` paired with those of table `$2` that have the same definition but
/// for their names and tables: (`$1`'s index, `$2`'s index).
const INDEXES_BUILT_ALIKE: &str = r"
    SELECT f.indexname::text, l.indexname::text
    FROM pg_indexes f JOIN pg_indexes l
      ON l.schemaname = f.schemaname
     AND regexp_replace(l.indexdef, '^(CREATE (UNIQUE )?INDEX )\S+ ON \S+', '\1')
       = regexp_replace(f.indexdef, '^(CREATE (UNIQUE )?INDEX )\S+ ON \S+', '\1')
    WHERE f.tablename = $1 AND l.tablename = $2";

async fn prepare_fresh_table(
    pool: &sqlx::PgPool,
    live: &Target,
    fresh: &Target,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    for (live, fresh) in live.tables().into_iter().zip(fresh.tables()) {
        // Several statements in one round trip, as in `swap_in`.
        let create = format!(
            "DROP TABLE IF EXISTS {fresh}; CREATE TABLE {fresh} (LIKE {live} INCLUDING ALL)"
        );
        tx.execute(sqlx::raw_sql(&create)).await?;
    }
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, version, position) VALUES ($1, $2, 0) \
         ON CONFLICT (projection) DO UPDATE SET version = excluded.version, position = 0",
    )
    .bind(fresh.checkpoint)
    .bind(USERS_VERSION)
    .execute(&mut *tx)
    .await?;
    tx.commit().await.context("preparing the rebuild table")?;
    Ok(())
}
