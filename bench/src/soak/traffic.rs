//! The soak's clients: the accounts and sessions they keep, the requests they send, and what
//! each answer must be.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::SecondsFormat;
use platform::clock::{Clock, SystemClock};
use reqwest::RequestBuilder;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use test_support::Services;
use uuid::Uuid;

use super::locks::{lock, read, write};
use super::routes::Route;
use super::scenario::{ADMIN_EMAIL, ADMIN_PASSWORD, Options, PASSWORD, SESSIONS, TOKEN_USE};
use super::stats::Stats;

/// What the traffic knows of the deployment: the accounts it registered, the tokens it got,
/// and how far the read model is known to have come.
pub(super) struct Traffic {
    pub(super) client: reqwest::Client,
    pub(super) command: String,
    pub(super) query: String,
    /// The aggregator's own port: `/healthz`, `/readyz`, `/metrics`.
    pub(super) aggregator: String,
    pub(super) scrape_every: Option<Duration>,
    /// The most messages the aggregator reported behind the store at a scrape.
    pub(super) max_lag: AtomicU64,
    pub(super) accounts: RwLock<Vec<Account>>,
    /// Accounts that only ever get wrong passwords (and end up locked).
    pub(super) decoys: RwLock<Vec<String>>,
    pub(super) sessions: Mutex<VecDeque<Session>>,
    /// The administrator's token and when it was issued.
    pub(super) admin: Mutex<Option<(Arc<str>, Instant)>>,
    /// One administrator login at a time when the token needs replacing.
    pub(super) admin_refresh: tokio::sync::Mutex<()>,
    /// The highest `X-Min-Position` a read was answered for: the read model holds every event
    /// up to it, so an account registered at or below it is readable without waiting.
    pub(super) confirmed: AtomicU64,
    /// Where the administrator's paging through the accounts is.
    pub(super) cursor: Mutex<Option<String>>,
    pub(super) next_email: AtomicU64,
    pub(super) granted_logins: AtomicU64,
    pub(super) registrations: Pacer,
    pub(super) logins: Pacer,
}

#[derive(Clone)]
pub(super) struct Account {
    pub(super) id: Uuid,
    pub(super) email: String,
    /// The global position of the registration.
    pub(super) position: u64,
}

#[derive(Clone)]
pub(super) struct Session {
    pub(super) id: Uuid,
    pub(super) token: Arc<str>,
    /// The account's registration: the read model must have it before `/users/me` answers.
    pub(super) position: u64,
    pub(super) issued: Instant,
}

impl Traffic {
    /// The traffic of a run against `services`, paced as `options` say, knowing nothing yet.
    pub(super) fn new(client: reqwest::Client, services: &Services, options: &Options) -> Self {
        let base = |port: u16| format!("http://127.0.0.1:{port}");
        Self {
            client,
            command: base(services.command_port),
            query: base(services.query_port),
            aggregator: base(services.aggregator_port),
            scrape_every: (options.scrape_every > 0)
                .then(|| Duration::from_secs(options.scrape_every)),
            max_lag: AtomicU64::new(0),
            accounts: RwLock::default(),
            decoys: RwLock::default(),
            sessions: Mutex::default(),
            admin: Mutex::new(None),
            admin_refresh: tokio::sync::Mutex::new(()),
            confirmed: AtomicU64::new(0),
            cursor: Mutex::new(None),
            next_email: AtomicU64::new(0),
            granted_logins: AtomicU64::new(0),
            registrations: Pacer::new(options.registrations_per_second),
            logins: Pacer::new(options.logins_per_second),
        }
    }

    /// One request of the mix (two for a login: it is followed by the profile it leads to).
    pub(super) async fn step(&self, stats: &Stats) {
        if self.registrations.take() {
            self.register(stats, false).await;
        } else if self.logins.take() {
            if fastrand::u32(..5) == 0 {
                self.refused_login(stats).await;
            } else {
                self.login_and_read(stats).await;
            }
        } else {
            match fastrand::u32(..100) {
                0..40 => self.read_me(stats).await,
                40..62 => self.read_own_profile(stats).await,
                62..75 => self.read_profile_as_admin(stats).await,
                75..84 => self.read_history(stats).await,
                84..94 => self.find_by_email(stats).await,
                _ => self.page_through(stats).await,
            }
        }
    }

    /// A `POST` of `body` to the command API's `path`.
    fn post_command(&self, path: &str, body: Value) -> RequestBuilder {
        self.client
            .post(format!("{}{path}", self.command))
            .json(&body)
    }

    /// `POST /login` with `email` and `password`.
    fn login_request(&self, email: &str, password: &str) -> RequestBuilder {
        self.post_command("/login", json!({ "email": email, "password": password }))
    }

    pub(super) async fn register(&self, stats: &Stats, decoy: bool) {
        let n = self.next_email.fetch_add(1, Ordering::Relaxed);
        let email = if decoy {
            format!("decoy-{n}@soak.example.com")
        } else {
            format!("user-{n}@soak.example.com")
        };
        let request = self.post_command("/users", json!({ "email": email, "password": PASSWORD }));
        let registered = stats
            .exchange(Route::Register, request, |headers, body| {
                let id = body["id"].as_str().context("no id")?.parse()?;
                let position = body["position"].as_u64().context("no position")?;
                anyhow::ensure!(
                    x_position(headers) == Some(position),
                    "X-Position is not the body's position"
                );
                Ok((id, position))
            })
            .await;
        if let Some((id, position)) = registered {
            if decoy {
                write(&self.decoys).push(email);
            } else {
                write(&self.accounts).push(Account {
                    id,
                    email,
                    position,
                });
            }
        }
    }

    /// A login with the right password: a session and the login's position.
    pub(super) async fn log_in(&self, stats: &Stats, account: &Account) -> Option<(Session, u64)> {
        let request = self.login_request(&account.email, PASSWORD);
        let (token, position) = stats
            .exchange(Route::Login, request, |headers, body| {
                anyhow::ensure!(body["token_type"] == "Bearer", "token_type is not Bearer");
                let token = body["access_token"].as_str().context("no access_token")?;
                let position = x_position(headers).context("no X-Position")?;
                Ok((Arc::<str>::from(token), position))
            })
            .await?;
        self.granted_logins.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            id: account.id,
            token,
            position: account.position,
            issued: Instant::now(),
        };
        Some((session, position))
    }

    /// A login, then the profile it leads to, read as soon as the read model has the login.
    pub(super) async fn login_and_read(&self, stats: &Stats) {
        // Often the newest account: a sign-up followed by a first login.
        let account = {
            let accounts = read(&self.accounts);
            let index = if fastrand::u32(..10) < 3 {
                accounts.len().checked_sub(1)
            } else {
                (!accounts.is_empty()).then(|| fastrand::usize(..accounts.len()))
            };
            index.and_then(|index| accounts.get(index).cloned())
        };
        let Some(account) = account else {
            return;
        };
        let Some((session, position)) = self.log_in(stats, &account).await else {
            return;
        };
        self.keep(session.clone());
        let request = self
            .client
            .get(format!("{}/users/me", self.query))
            .bearer_auth(&*session.token)
            .header("x-min-position", position);
        let answered = stats
            .exchange(Route::Me, request, |_, body| {
                anyhow::ensure!(body["id"] == session.id.to_string(), "another account");
                anyhow::ensure!(
                    body["login_count"].as_u64() >= Some(1) && body["last_login_at"].is_string(),
                    "the login is not in the profile"
                );
                Ok(())
            })
            .await;
        if answered.is_some() {
            self.confirmed.fetch_max(position, Ordering::Relaxed);
        }
    }

    /// A wrong password for an account that never gets the right one, or an unknown email.
    pub(super) async fn refused_login(&self, stats: &Stats) {
        let decoy = {
            let decoys = read(&self.decoys);
            (fastrand::u32(..4) != 0 && !decoys.is_empty())
                .then(|| decoys[fastrand::usize(..decoys.len())].clone())
        };
        let email = decoy.unwrap_or_else(|| {
            format!(
                "nobody-{}@soak.example.com",
                self.next_email.fetch_add(1, Ordering::Relaxed)
            )
        });
        let request = self.login_request(&email, "not the password");
        stats
            .exchange(Route::LoginRefused, request, |_, body| {
                anyhow::ensure!(body["code"] == "invalid_credentials", "another code");
                Ok(())
            })
            .await;
    }

    pub(super) async fn read_me(&self, stats: &Stats) {
        let Some(session) = self.session() else {
            return self.login_and_read(stats).await;
        };
        let request = self
            .client
            .get(format!("{}/users/me", self.query))
            .bearer_auth(&*session.token);
        self.read_account(stats, Route::Me, request, session.id, session.position)
            .await;
    }

    /// The caller's own profile; one in twenty as it stood a moment ago (`as_of`).
    pub(super) async fn read_own_profile(&self, stats: &Stats) {
        let Some(session) = self.session() else {
            return self.login_and_read(stats).await;
        };
        let mut request = self
            .client
            .get(format!("{}/users/{}", self.query, session.id))
            .bearer_auth(&*session.token);
        if fastrand::u32(..20) == 0 {
            let now = SystemClock
                .now()
                .to_rfc3339_opts(SecondsFormat::Millis, true);
            request = request.query(&[("as_of", now)]);
        }
        self.read_account(stats, Route::Profile, request, session.id, session.position)
            .await;
    }

    pub(super) async fn read_profile_as_admin(&self, stats: &Stats) {
        let (Some(account), Some(admin)) = (self.account(), self.admin_token(stats).await) else {
            return;
        };
        let request = self
            .client
            .get(format!("{}/users/{}", self.query, account.id))
            .bearer_auth(&*admin);
        self.read_account(stats, Route::Profile, request, account.id, account.position)
            .await;
    }

    /// Sends `request` for the account `id`, registered at `registered`, and checks that the
    /// answer is that account; with `X-Min-Position` when the read model may not hold it yet.
    async fn read_account(
        &self,
        stats: &Stats,
        route: Route,
        request: RequestBuilder,
        id: Uuid,
        registered: u64,
    ) {
        let min_position = self.min_position(registered);
        let request = self.with_min_position(request, min_position);
        let answered = stats
            .exchange(route, request, |_, body| {
                anyhow::ensure!(body["id"] == id.to_string(), "another account");
                Ok(())
            })
            .await;
        self.confirm(answered, min_position);
    }

    /// The caller's own history, from the message store.
    pub(super) async fn read_history(&self, stats: &Stats) {
        let Some(session) = self.session() else {
            return self.login_and_read(stats).await;
        };
        let request = self
            .client
            .get(format!("{}/users/{}/events", self.query, session.id))
            .bearer_auth(&*session.token);
        stats
            .exchange(Route::Events, request, |_, body| {
                let items = body["items"].as_array().context("no items")?;
                anyhow::ensure!(!items.is_empty(), "no events");
                Ok(())
            })
            .await;
    }

    pub(super) async fn find_by_email(&self, stats: &Stats) {
        let (Some(account), Some(admin)) = (self.account(), self.admin_token(stats).await) else {
            return;
        };
        let min_position = self.min_position(account.position);
        let request = self
            .with_min_position(
                self.client.get(format!("{}/users", self.query)),
                min_position,
            )
            .query(&[("email", &account.email)])
            .bearer_auth(&*admin);
        let answered = stats
            .exchange(Route::List, request, |_, body| {
                let items = body["items"].as_array().context("no items")?;
                anyhow::ensure!(
                    items.len() == 1 && items[0]["id"] == account.id.to_string(),
                    "not exactly the account"
                );
                Ok(())
            })
            .await;
        self.confirm(answered, min_position);
    }

    /// The administrator pages through the active accounts, 50 at a time, and starts over.
    pub(super) async fn page_through(&self, stats: &Stats) {
        let Some(admin) = self.admin_token(stats).await else {
            return;
        };
        let cursor = lock(&self.cursor).clone();
        let mut query = vec![("status", "active".to_owned()), ("limit", "50".to_owned())];
        if let Some(cursor) = &cursor {
            query.push(("cursor", cursor.clone()));
        }
        let request = self
            .client
            .get(format!("{}/users", self.query))
            .query(&query)
            .bearer_auth(&*admin);
        let next = stats
            .exchange(Route::List, request, |_, body| {
                let items = body["items"].as_array().context("no items")?;
                anyhow::ensure!(
                    cursor.is_some() || !items.is_empty(),
                    "the first page is empty"
                );
                Ok(body["next_cursor"].as_str().map(str::to_owned))
            })
            .await;
        if let Some(next) = next {
            *lock(&self.cursor) = next;
        }
    }

    /// What Prometheus does: `/metrics` of each process; the aggregator's says how far the
    /// read model is behind.
    pub(super) async fn scrape(&self, stats: &Stats) {
        for base in [&self.command, &self.query, &self.aggregator] {
            let request = self.client.get(format!("{base}/metrics"));
            let lag = stats
                .exchange_text(Route::Metrics, request, |text| {
                    anyhow::ensure!(text.contains("# TYPE"), "not the Prometheus text format");
                    Ok(text
                        .lines()
                        .filter(|line| line.starts_with("projection_lag_events"))
                        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                        .fold(0.0, f64::max))
                })
                .await;
            if let Some(lag) = lag {
                self.max_lag.fetch_max(lag as u64, Ordering::Relaxed);
            }
        }
    }

    pub(super) fn account(&self) -> Option<Account> {
        let accounts = read(&self.accounts);
        (!accounts.is_empty()).then(|| accounts[fastrand::usize(..accounts.len())].clone())
    }

    /// A session of the recent logins; `None` when there is none young enough.
    pub(super) fn session(&self) -> Option<Session> {
        let mut sessions = lock(&self.sessions);
        if sessions.is_empty() {
            return None;
        }
        let index = fastrand::usize(..sessions.len());
        if sessions[index].issued.elapsed() > TOKEN_USE {
            sessions.remove(index);
            return None;
        }
        sessions.get(index).cloned()
    }

    pub(super) fn keep(&self, session: Session) {
        let mut sessions = lock(&self.sessions);
        if sessions.len() >= SESSIONS {
            sessions.pop_front();
        }
        sessions.push_back(session);
    }

    /// The administrator's token, replaced by a new login when it has been used long enough.
    pub(super) async fn admin_token(&self, stats: &Stats) -> Option<Arc<str>> {
        if let Some(token) = self.fresh_admin_token() {
            return Some(token);
        }
        let _one_at_a_time = self.admin_refresh.lock().await;
        if let Some(token) = self.fresh_admin_token() {
            return Some(token);
        }
        let request = self.login_request(ADMIN_EMAIL, ADMIN_PASSWORD);
        let token = stats
            .exchange(Route::Login, request, |_, body| {
                Ok(Arc::<str>::from(
                    body["access_token"].as_str().context("no access_token")?,
                ))
            })
            .await?;
        self.granted_logins.fetch_add(1, Ordering::Relaxed);
        *lock(&self.admin) = Some((token.clone(), Instant::now()));
        Some(token)
    }

    pub(super) fn fresh_admin_token(&self) -> Option<Arc<str>> {
        lock(&self.admin)
            .as_ref()
            .filter(|(_, issued)| issued.elapsed() < TOKEN_USE)
            .map(|(token, _)| token.clone())
    }

    /// Whether to send `X-Min-Position`: always when the read model may not hold the account
    /// yet, and one read in ten anyway.
    pub(super) fn min_position(&self, needed: u64) -> Option<u64> {
        (needed > self.confirmed.load(Ordering::Relaxed) || fastrand::u32(..10) == 0)
            .then_some(needed)
    }

    pub(super) fn with_min_position(
        &self,
        request: RequestBuilder,
        position: Option<u64>,
    ) -> RequestBuilder {
        match position {
            Some(position) => request.header("x-min-position", position),
            None => request,
        }
    }

    pub(super) fn confirm(&self, answered: Option<()>, min_position: Option<u64>) {
        if let (Some(()), Some(position)) = (answered, min_position) {
            self.confirmed.fetch_max(position, Ordering::Relaxed);
        }
    }
}

/// Lets an operation through at a steady rate, whichever client asks; a backlog of more than a
/// second (the clients were all busy) is dropped rather than caught up in a burst.
pub(super) struct Pacer {
    pub(super) interval: Option<Duration>,
    pub(super) next: Mutex<Instant>,
}

impl Pacer {
    pub(super) fn new(per_second: f64) -> Self {
        let interval = (per_second > 0.0).then(|| Duration::from_secs_f64(1.0 / per_second));
        Self {
            interval,
            next: Mutex::new(Instant::now()),
        }
    }

    pub(super) fn take(&self) -> bool {
        let Some(interval) = self.interval else {
            return false;
        };
        let now = Instant::now();
        let mut next = lock(&self.next);
        if now < *next {
            return false;
        }
        if now > *next + Duration::from_secs(1) {
            *next = now;
        }
        *next += interval;
        true
    }
}

fn x_position(headers: &HeaderMap) -> Option<u64> {
    headers.get("x-position")?.to_str().ok()?.parse().ok()
}
