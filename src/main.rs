//! `identity-service`: the whole service in one process, for trying it out and for small
//! installations. The command routes, the query routes and the projector share one port, one
//! message store and one read model: an SQLite file under `data/` by default (created on first
//! start, kept across restarts), or PostgreSQL when `IDENTITY__DATABASE__URL` names one. A
//! signing key is created on first start and kept beside the database.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use clap::Parser;
use message_store::MessageStore;
use platform::clock::{Clock, SystemClock};
use tokio::sync::watch;
use utoipa::OpenApi;

/// The standalone mode's defaults, where they differ from the split deployment's.
const STANDALONE_DEFAULTS: &[(&str, &str)] = &[
    ("database.url", "sqlite://data/identity.db"),
    ("http.address", "127.0.0.1:8080"),
    ("log.format", "pretty"),
    ("tokens.signing_key_file", "data/signing-key.pem"),
    ("tokens.create_key_if_missing", "true"),
];

#[derive(Parser)]
#[command(
    version,
    about = "The identity service in one process (command, query and projector)"
)]
struct Cli {
    /// A TOML settings file; IDENTITY__... environment variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let file = cli.config.as_deref();
    let commands: command_api::Settings =
        platform::settings::load_with_defaults(file, STANDALONE_DEFAULTS)?;
    let queries: query_api::Settings =
        platform::settings::load_with_defaults(file, STANDALONE_DEFAULTS)?;
    let projection: aggregator::Settings =
        platform::settings::load_with_defaults(file, STANDALONE_DEFAULTS)?;
    platform::telemetry::init(&commands.log);
    platform::metrics::handle();
    create_parent_directories(&commands)?;

    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = projection.connect_store().await?;
    let read_model = projection.connect_read_model().await?;
    read_model
        .migrate()
        .await
        .context("applying the read model migrations")?;

    let (stop, stopped) = watch::channel(false);
    let projector = aggregator::Projector::users(
        store.clone(),
        read_model.clone(),
        projection.projector_options(),
    );
    let projecting = tokio::spawn(projector.run(wait_for(stopped.clone())));

    let command_state = command_api::state_with_store(&commands, clock.clone(), store.clone())?;
    let query_state = query_api::AppState::new(
        query_api::ReadModel::connect(
            queries.read_model.url_or(&queries.database).expose(),
            queries.read_model_connections(),
        )
        .await
        .context("opening the read model for queries")?,
        store.clone(),
        command_state.verifier.clone(),
        clock.clone(),
        queries.query,
    );
    let pruning = tokio::spawn(command_api::prune_login_history(
        command_state.commands.clone(),
        std::time::Duration::from_secs(u64::from(commands.login.history_retention_days) * 86_400),
        std::time::Duration::from_secs(commands.login.prune_interval_seconds.max(1)),
    ));

    let shared = Shared {
        jwks: command_state.commands.issuer.jwks(),
        store: store.clone(),
        read_model: query_state.read_model.clone(),
    };
    let app = platform::http::with_common_layers(
        command_api::command_routes(command_state)
            .merge(query_api::query_routes(query_state))
            .merge(
                Router::new()
                    .route("/.well-known/jwks.json", get(jwks))
                    .route("/openapi.json", get(openapi))
                    .route("/readyz", get(readyz))
                    .with_state(shared),
            ),
    );

    let listener = tokio::net::TcpListener::bind(&commands.http.address)
        .await
        .with_context(|| format!("binding {}", commands.http.address))?;
    let address = listener.local_addr()?;
    println!("identity service listening on http://{address}");
    println!(
        "try: curl -si -X POST http://{address}/users -H 'content-type: application/json' \
         -d '{{\"email\":\"ann@example.com\",\"password\":\"correct horse battery\"}}'"
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            platform::shutdown::signal().await;
            let _ = stop.send(true);
        })
        .await
        .context("serving HTTP")?;
    // The projector finishes the batch in flight, then stops.
    projecting.await.context("stopping the projector")?;
    pruning.abort();
    Ok(())
}

/// Completes when `stopped` turns true.
async fn wait_for(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stopped| *stopped).await;
}

/// The SQLite file and the signing key live in a directory that may not exist yet.
fn create_parent_directories(settings: &command_api::Settings) -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(path) = settings.database.url.sqlite_file() {
        files.push(PathBuf::from(path));
    }
    if let Some(key) = &settings.tokens.signing_key_file {
        files.push(key.clone());
    }
    for file in files {
        if let Some(directory) = file.parent().filter(|parent| *parent != Path::new("")) {
            std::fs::create_dir_all(directory)
                .with_context(|| format!("creating {}", directory.display()))?;
        }
    }
    Ok(())
}

#[derive(Clone)]
struct Shared {
    jwks: serde_json::Value,
    store: Arc<dyn MessageStore>,
    read_model: query_api::ReadModel,
}

async fn jwks(State(shared): State<Shared>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        axum::Json(shared.jwks),
    )
}

async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    let mut document = command_api::ApiDoc::openapi();
    document.merge(query_api::ApiDoc::openapi());
    document.info.title = "Identity service".into();
    axum::Json(document)
}

async fn readyz(State(shared): State<Shared>) -> Result<&'static str, platform::Problem> {
    let store = shared.store.ping().await;
    let read_model = shared.read_model.ping().await;
    if let Err(error) = &store {
        tracing::warn!(%error, "the message store is not reachable");
    }
    if let Err(error) = &read_model {
        tracing::warn!(%error, "the read model is not reachable");
    }
    match (store, read_model) {
        (Ok(()), Ok(())) => Ok("ready"),
        _ => Err(platform::Problem::unavailable()),
    }
}
