//! The sessions the query API found live, remembered so that a request in one reads nothing
//! from the store, and the follower of session ends that lets them be remembered for longer than
//! `query.max_view_lag_ms` without a logout taking longer than that to be refused (ADR 11).
//!
//! Every token's session is checked in the message store, never in the read model: its
//! stream's last message must show it live. What bounds how long a logout goes unseen is how
//! long an answer that a session is live is trusted ([`VerifiedSessions`]):
//!
//! - for `max_view_lag_ms` after the instant its stream was asked (taken before the read, so
//!   every end committed before that instant was seen): the time rule. It needs nothing else,
//!   and costs one store read per session per `max_view_lag_ms`, which with many sessions is
//!   most of what a request costs;
//! - or while the follower of session ends is current, up to the session's own limits.
//!   [`SessionEndsFollower`] reads the `session` category from where the store's head was when
//!   it started, drops each session from memory as it passes its end, and publishes the position
//!   it has read up to. When [`ViewFreshness`] says that position holds every message committed
//!   before `now - max_view_lag_ms` (the rule that lets a row of the users view speak for an
//!   account), every end older than the bound has been passed, and so dropped: whatever is still
//!   remembered had not ended then.
//!
//! A follower that is behind (a slow store, a long write transaction holding back what readers
//! of the global order see, ADR 2) or a store out of reach leaves the time rule alone: nothing is
//! trusted for longer than it would be without a follower. Whether the account is still active,
//! and in the session's epoch, is not the follower's concern: [`crate::auth`] checks that on
//! every request.
//!
//! Two races are closed here. An answer read before the follower started may predate an end
//! below its start position, which it never reads: only answers asked after it started are
//! trusted by its rule. And a request that read a session's stream just before its end may come
//! to remember its answer after the follower has passed that end and dropped the session:
//! the follower keeps the sessions it saw end for a while, and such an answer is not
//! remembered.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use identity::{EventData, LiveSession, SESSION_CATEGORY, SessionRefreshed, SessionStarted};
use message_store::{GlobalPosition, MessageStore, RecordedMessage, StoreError};
use uuid::Uuid;

use crate::freshness::ViewFreshness;

/// Sessions whose stream said, at an instant, that they are live, trusted (and a request in
/// one reads nothing from the store for it) while either rule of this module holds and never
/// past the session's own limits: for `max_age` after that instant (taken before the stream was
/// read), or while the follower of session ends is current. A logout is then refused within
/// `max_age` of its commit; 0 remembers nothing. The session's epoch is remembered with it, and
/// compared on every request with the account's current one, so an end by the epoch does not
/// wait for this. Ended and unknown sessions are never remembered.
///
/// Bounded: when full, the entries that no longer vouch are dropped, and if that frees nothing
/// it starts over.
pub struct VerifiedSessions {
    memory: Mutex<Memory>,
    /// Where the follower has read to, once it has started.
    followed: RwLock<Option<Followed>>,
    freshness: Arc<ViewFreshness>,
    max_age: Duration,
}

/// What one lock guards: the follower drops an ended session and records its end in one step,
/// so a request remembering an answer sees either the session still there or its end.
#[derive(Default)]
struct Memory {
    verified: HashMap<Uuid, RememberedSession>,
    ended: RecentEnds,
}

struct RememberedSession {
    /// When its stream was asked.
    asked: Instant,
    session: Arc<LiveSession>,
}

impl RememberedSession {
    /// Whether it may be taken at its word at `now` (`clock` is this API's time then):
    /// `followed_since` is when the follower started, if it is current at `now`.
    fn vouches_at(
        &self,
        now: Instant,
        clock: DateTime<Utc>,
        max_age: Duration,
        followed_since: Option<Instant>,
    ) -> bool {
        let recent = now.saturating_duration_since(self.asked) < max_age;
        let followed = followed_since.is_some_and(|since| self.asked >= since);
        (recent || followed) && !self.session.is_expired_at(clock)
    }
}

#[derive(Debug, Clone, Copy)]
struct Followed {
    /// Taken once the follower's start position was read: every end committed after it lies
    /// past that position, where the follower reads.
    since: Instant,
    /// Every message of the session category at or below it has been applied.
    position: GlobalPosition,
}

/// Sessions the follower saw end, kept so that an answer read before their end is not
/// remembered after the follower dropped them. An end is final: any end of a session is later
/// than every message that showed it live, so being here is enough.
///
/// Bounded by count alone: an end forgotten for room leaves the instant it was recorded at, and
/// no answer asked before that is remembered (such an answer was read before the end was
/// committed, which was before the follower read it). So forgetting costs a store read at
/// worst, never the bound.
#[derive(Default)]
struct RecentEnds {
    sessions: HashSet<Uuid>,
    /// When each was recorded, oldest first.
    order: VecDeque<(Instant, Uuid)>,
    /// When the last end forgotten for room was recorded.
    forgotten_up_to: Option<Instant>,
}

impl RecentEnds {
    const CAPACITY: usize = 10_000;

    fn record(&mut self, id: Uuid, at: Instant) {
        if self.sessions.insert(id) {
            self.order.push_back((at, id));
        }
        while self.order.len() > Self::CAPACITY {
            if let Some((recorded, forgotten)) = self.order.pop_front() {
                self.sessions.remove(&forgotten);
                self.forgotten_up_to = Some(recorded);
            }
        }
    }

    /// Whether an answer asked at `asked` that `id` is live may predate an end the follower has
    /// passed.
    fn may_have_passed(&self, id: Uuid, asked: Instant) -> bool {
        self.sessions.contains(&id) || self.forgotten_up_to.is_some_and(|up_to| asked <= up_to)
    }
}

impl VerifiedSessions {
    const CAPACITY: usize = 10_000;

    /// Remembers answers for `max_age` (0 remembers none), and for as long as the follower's
    /// position is covered by `freshness` once a [`SessionEndsFollower`] runs.
    pub fn new(max_age: Duration, freshness: Arc<ViewFreshness>) -> Self {
        Self {
            memory: Mutex::default(),
            followed: RwLock::default(),
            freshness,
            max_age,
        }
    }

    /// The session `id`, if its stream said it was live and that is still trusted at `now`,
    /// and it is not past its limits at `clock` (this API's clock). An entry that no longer
    /// vouches is dropped.
    pub fn vouch_for(
        &self,
        id: Uuid,
        now: Instant,
        clock: DateTime<Utc>,
    ) -> Option<Arc<LiveSession>> {
        let followed_since = self.followed_since(now);
        let mut memory = self.lock();
        let remembered = memory.verified.get(&id)?;
        if remembered.vouches_at(now, clock, self.max_age, followed_since) {
            return Some(remembered.session.clone());
        }
        memory.verified.remove(&id);
        None
    }

    /// Remembers that session `id`'s stream, read after `asked`, showed it live as `session`;
    /// `clock` is this API's time then. One already past its limits is not remembered, nor one
    /// the follower may have seen end since.
    pub fn remember(
        &self,
        id: Uuid,
        session: Arc<LiveSession>,
        asked: Instant,
        clock: DateTime<Utc>,
    ) {
        if self.max_age.is_zero() || session.is_expired_at(clock) {
            return;
        }
        let followed_since = self.followed_since(asked);
        let mut memory = self.lock();
        if memory.ended.may_have_passed(id, asked) {
            return;
        }
        let verified = &mut memory.verified;
        if verified.len() >= Self::CAPACITY && !verified.contains_key(&id) {
            let max_age = self.max_age;
            verified.retain(|_, kept| kept.vouches_at(asked, clock, max_age, followed_since));
            if verified.len() >= Self::CAPACITY {
                verified.clear();
            }
        }
        // An older answer arriving late never replaces a newer one.
        if verified.get(&id).is_none_or(|kept| kept.asked < asked) {
            verified.insert(id, RememberedSession { asked, session });
        }
    }

    /// When the follower started, if at `now` it has passed every end committed before
    /// `now - max_age`.
    fn followed_since(&self, now: Instant) -> Option<Instant> {
        let followed = (*self.followed.read().unwrap_or_else(PoisonError::into_inner))?;
        self.freshness
            .covers(followed.position, now)
            .then_some(followed.since)
    }

    /// The follower starts reading after `position`, read before `since`.
    fn start_following(&self, position: GlobalPosition, since: Instant) {
        *self
            .followed
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Followed { since, position });
    }

    /// Drops the sessions `ended` and records their end, read at `at`.
    fn ended(&self, ended: impl IntoIterator<Item = Uuid>, at: Instant) {
        let mut memory = self.lock();
        for id in ended {
            memory.verified.remove(&id);
            memory.ended.record(id, at);
        }
    }

    /// The follower has applied every session message up to `position`; called only after
    /// [`Self::ended`] for them.
    fn followed_to(&self, position: GlobalPosition) {
        let mut followed = self
            .followed
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(followed) = followed.as_mut() {
            followed.position = followed.position.max(position);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How many messages of the session category one read takes.
const BATCH: usize = 1_000;

/// Reads the ends of sessions from the message store as they are committed, and drops the
/// ended sessions from [`VerifiedSessions`]. It keeps nothing across restarts and needs
/// nothing: it starts at the store's head, with nothing remembered from before.
pub struct SessionEndsFollower {
    sessions: Arc<VerifiedSessions>,
    store: Arc<dyn MessageStore>,
    /// The position read up to; none before the first step.
    position: Option<GlobalPosition>,
}

/// What a step of the follower found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// It has read up to where the store's readers were when the step began.
    CaughtUp,
    /// It read a full batch: there may be more to read at once.
    More,
}

impl SessionEndsFollower {
    pub fn new(sessions: Arc<VerifiedSessions>, store: Arc<dyn MessageStore>) -> Self {
        Self {
            sessions,
            store,
            position: None,
        }
    }

    /// Reads what the session category holds past the follower's position, drops the sessions
    /// that ended, and publishes how far it has read. The first step only reads the store's head.
    pub async fn step(&mut self) -> Result<Step, StoreError> {
        // Every message at or below the head is committed and visible to the read that follows
        // (ADR 2), so a read that returns less than a batch has seen all of them: the position
        // moves to the head even when no session message lies near it, as most messages do not.
        let head = self.store.head_position().await?;
        let Some(after) = self.position else {
            self.sessions.start_following(head, Instant::now());
            self.position = Some(head);
            return Ok(Step::CaughtUp);
        };
        let batch = self
            .store
            .read_category(SESSION_CATEGORY, after, BATCH)
            .await?;
        self.sessions
            .ended(batch.iter().filter_map(ended_session), Instant::now());
        let last = batch
            .last()
            .map_or(after, |message| message.global_position);
        let (position, step) = if batch.len() < BATCH {
            (last.max(head), Step::CaughtUp)
        } else {
            (last, Step::More)
        };
        self.sessions.followed_to(position);
        self.position = Some(position);
        Ok(step)
    }

    /// Steps every `interval`, at once again after a full batch, until `shutdown` completes; a
    /// failure is logged once, when it starts, and retried.
    pub async fn follow(mut self, interval: Duration, shutdown: impl Future<Output = ()>) {
        tokio::select! {
            () = shutdown => {}
            () = self.keep_following(interval) => {}
        }
    }

    async fn keep_following(&mut self, interval: Duration) {
        let mut failing = false;
        loop {
            let step = self.step().await;
            match &step {
                Ok(_) if failing => {
                    tracing::info!("following the ends of sessions works again");
                    failing = false;
                }
                Ok(_) => {}
                Err(error) if !failing => {
                    tracing::warn!(
                        %error,
                        "following the ends of sessions failed; a session found live is trusted \
                         only for query.max_view_lag_ms after its stream was read until it works \
                         again"
                    );
                    failing = true;
                }
                Err(_) => {}
            }
            if !matches!(step, Ok(Step::More)) {
                tokio::time::sleep(interval).await;
            }
        }
    }
}

/// The session `message` ends, if it ends one: a `SessionEnded`, or a message of a type this
/// build does not know (a newer writer's), which is taken as an end rather than trusted. The
/// session is the stream's id; a stream whose id is not a session id names no token's session.
fn ended_session(message: &RecordedMessage) -> Option<Uuid> {
    let kind = message.message_type.as_str();
    if kind == SessionStarted::TYPE || kind == SessionRefreshed::TYPE {
        return None;
    }
    message.stream.id().and_then(|id| Uuid::parse_str(id).ok())
}

#[cfg(test)]
mod tests {
    use chrono::{TimeDelta, TimeZone};
    use identity::{
        SessionEndReason, SessionEnded, SessionEvent, SessionId, UserId, session_stream_name,
    };
    use message_store::{ExpectedVersion, NewMessage, StreamAppend, StreamName};
    use serde_json::{Value, json};
    use test_support::TestDatabase;

    use super::*;

    const BOUND: Duration = Duration::from_millis(1_000);

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    /// Sessions remembered for `max_age` with no follower: the time rule alone.
    fn unfollowed(max_age: Duration) -> VerifiedSessions {
        VerifiedSessions::new(max_age, Arc::new(ViewFreshness::new(max_age)))
    }

    /// Sessions remembered for [`BOUND`] whose follower started at `start` at position 10, the
    /// store's last position sampled then; and the samples, to add more.
    fn followed_from(start: Instant) -> (VerifiedSessions, Arc<ViewFreshness>) {
        let freshness = Arc::new(ViewFreshness::new(BOUND));
        freshness.sampled(start, 10);
        let sessions = VerifiedSessions::new(BOUND, freshness.clone());
        sessions.start_following(10, start);
        (sessions, freshness)
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap()
    }

    /// A session started at [`t0`] in epoch 2 whose idle limit comes after an hour (its
    /// absolute one after a day).
    fn live_session() -> Arc<LiveSession> {
        Arc::new(LiveSession {
            session_id: SessionId::from_uuid(Uuid::new_v4()),
            user_id: UserId::from_uuid(Uuid::new_v4()),
            session_epoch: 2,
            started_at: t0(),
            expires_at: t0() + TimeDelta::days(1),
            idle_expires_at: t0() + TimeDelta::hours(1),
            user_agent: None,
            generation: 0,
            nonce: identity::RefreshNonce::from_bytes([7; 32]),
            previous: None,
        })
    }

    fn held(sessions: &VerifiedSessions) -> usize {
        sessions.lock().verified.len()
    }

    #[test]
    fn a_session_is_vouched_for_only_within_the_bound_after_its_stream_was_asked() {
        let sessions = unfollowed(Duration::from_millis(1_000));
        let (id, session) = (Uuid::new_v4(), live_session());
        let asked = Instant::now();
        assert!(
            sessions.vouch_for(id, asked, t0()).is_none(),
            "nobody asked yet"
        );

        sessions.remember(id, session.clone(), asked, t0());
        let just_within = asked + Duration::from_millis(999);
        assert_eq!(
            sessions.vouch_for(id, just_within, t0()),
            Some(session.clone())
        );
        assert!(sessions.vouch_for(Uuid::new_v4(), asked, t0()).is_none());
        let at_the_bound = asked + Duration::from_millis(1_000);
        assert!(sessions.vouch_for(id, at_the_bound, t0()).is_none());
        assert_eq!(
            held(&sessions),
            0,
            "an entry that no longer vouches is dropped"
        );

        // An older answer arriving late does not push back a newer one's expiry.
        let later = asked + Duration::from_millis(500);
        sessions.remember(id, session.clone(), later, t0());
        sessions.remember(id, session.clone(), asked, t0());
        let within_the_later = later + Duration::from_millis(999);
        assert!(sessions.vouch_for(id, within_the_later, t0()).is_some());
    }

    #[test]
    fn a_session_is_never_vouched_for_past_its_limits() {
        let sessions = unfollowed(Duration::from_secs(3_600));
        let (id, session) = (Uuid::new_v4(), live_session());
        let asked = Instant::now();
        let idle_limit = session.idle_expires_at;
        sessions.remember(id, session, asked, t0());

        let before = idle_limit - TimeDelta::milliseconds(1);
        assert!(sessions.vouch_for(id, asked, before).is_some());
        assert!(sessions.vouch_for(id, asked, idle_limit).is_none());

        sessions.remember(id, live_session(), asked, idle_limit);
        assert_eq!(
            held(&sessions),
            0,
            "a session past its limits is not remembered"
        );
    }

    #[test]
    fn with_no_bound_no_session_is_remembered() {
        let sessions = unfollowed(Duration::ZERO);
        let (id, asked) = (Uuid::new_v4(), Instant::now());
        sessions.remember(id, live_session(), asked, t0());
        assert!(sessions.vouch_for(id, asked, t0()).is_none());
        assert_eq!(held(&sessions), 0);
    }

    #[test]
    fn the_sessions_remembered_are_bounded_and_the_expired_ones_go_first() {
        let sessions = unfollowed(Duration::from_secs(60));
        let asked = Instant::now();
        for _ in 0..VerifiedSessions::CAPACITY - 1 {
            sessions.remember(Uuid::new_v4(), live_session(), asked, t0());
        }
        // Past the bound of all those, a new one makes room by dropping them.
        let (recent, later) = (Uuid::new_v4(), asked + Duration::from_secs(61));
        sessions.remember(recent, live_session(), later, t0());
        let last = Uuid::new_v4();
        sessions.remember(last, live_session(), later, t0());
        assert_eq!(held(&sessions), 2);
        assert!(sessions.vouch_for(recent, later, t0()).is_some());

        // All of them current: it starts over rather than grow.
        for _ in 0..=VerifiedSessions::CAPACITY {
            sessions.remember(Uuid::new_v4(), live_session(), later, t0());
        }
        assert!(
            held(&sessions) <= VerifiedSessions::CAPACITY,
            "{}",
            held(&sessions)
        );
    }

    #[test]
    fn while_the_follower_is_current_a_remembered_session_is_trusted_past_the_bound_up_to_its_limits()
     {
        let start = Instant::now();
        let (sessions, freshness) = followed_from(start);
        let (id, session) = (Uuid::new_v4(), live_session());
        let asked = start + ms(100);
        sessions.remember(id, session.clone(), asked, t0());

        // Five bounds later, the store's last position sampled lately is where the follower is.
        let later = asked + 5 * BOUND;
        freshness.sampled(later - ms(500), 25);
        sessions.followed_to(25);
        assert_eq!(sessions.vouch_for(id, later, t0()), Some(session.clone()));
        assert!(
            sessions
                .vouch_for(id, later, session.usable_until())
                .is_none()
        );
    }

    #[test]
    fn with_the_follower_behind_the_store_or_the_store_out_of_reach_only_the_time_rule_holds() {
        let start = Instant::now();
        let (sessions, freshness) = followed_from(start);
        let (id, session) = (Uuid::new_v4(), live_session());
        let asked = start + ms(100);
        sessions.remember(id, session.clone(), asked, t0());

        // The store moved on to 25; the follower is still at 10.
        freshness.sampled(asked + ms(100), 25);
        let just_within = asked + ms(999);
        assert_eq!(sessions.vouch_for(id, just_within, t0()), Some(session));
        assert!(sessions.vouch_for(id, asked + BOUND, t0()).is_none());

        // The follower caught up, then nothing was sampled for a bound: the store is out of
        // reach, and whatever the follower read says nothing of what was committed since.
        sessions.followed_to(25);
        let asked = asked + ms(200);
        sessions.remember(id, live_session(), asked, t0());
        assert!(sessions.vouch_for(id, asked + ms(999), t0()).is_some());
        let unsampled = asked + ms(100) + BOUND;
        assert!(sessions.vouch_for(id, unsampled, t0()).is_none());
    }

    #[test]
    fn an_answer_read_before_the_follower_started_is_trusted_only_within_the_bound() {
        let start = Instant::now();
        let freshness = Arc::new(ViewFreshness::new(BOUND));
        let sessions = VerifiedSessions::new(BOUND, freshness.clone());
        let (before, after) = (Uuid::new_v4(), Uuid::new_v4());
        sessions.remember(before, live_session(), start, t0());

        // The follower starts, and stays current: an end of `before` committed before it
        // started lies below where it reads, so only the time rule vouches for that answer.
        let since = start + ms(10);
        freshness.sampled(since, 10);
        sessions.start_following(10, since);
        sessions.remember(after, live_session(), since + ms(1), t0());
        let later = start + 3 * BOUND;
        freshness.sampled(later - ms(100), 10);
        assert!(sessions.vouch_for(before, later, t0()).is_none());
        assert!(sessions.vouch_for(after, later, t0()).is_some());
    }

    #[test]
    fn a_session_the_follower_sees_end_is_dropped_at_once() {
        let sessions = unfollowed(Duration::from_secs(60));
        let (id, asked) = (Uuid::new_v4(), Instant::now());
        sessions.remember(id, live_session(), asked, t0());

        sessions.ended([id], asked + ms(1));
        assert!(sessions.vouch_for(id, asked + ms(2), t0()).is_none());
        assert_eq!(held(&sessions), 0);
    }

    /// The insertion race: a request reads a session's stream (live), the session ends, the
    /// follower passes the end, and only then does the request remember what it read.
    #[test]
    fn an_answer_read_before_an_end_the_follower_has_passed_is_not_remembered() {
        let sessions = unfollowed(Duration::from_secs(60));
        let (ended, live, asked) = (Uuid::new_v4(), Uuid::new_v4(), Instant::now());

        sessions.ended([ended], asked + ms(5));
        sessions.remember(ended, live_session(), asked, t0());
        sessions.remember(live, live_session(), asked, t0());
        assert!(sessions.vouch_for(ended, asked + ms(6), t0()).is_none());
        assert!(sessions.vouch_for(live, asked + ms(6), t0()).is_some());
    }

    #[test]
    fn the_ends_kept_are_bounded_and_no_answer_older_than_a_forgotten_one_is_remembered() {
        let sessions = unfollowed(Duration::from_secs(60));
        let start = Instant::now();
        let first = Uuid::new_v4();
        sessions.ended([first], start + ms(1));
        sessions.ended(
            (0..RecentEnds::CAPACITY).map(|_| Uuid::new_v4()),
            start + ms(2),
        );
        {
            let memory = sessions.lock();
            assert_eq!(memory.ended.order.len(), RecentEnds::CAPACITY);
            assert!(
                !memory.ended.sessions.contains(&first),
                "the oldest end is forgotten"
            );
        }

        // Read before the forgotten end was: not remembered, whichever session it is.
        for id in [first, Uuid::new_v4()] {
            sessions.remember(id, live_session(), start, t0());
            assert!(sessions.vouch_for(id, start, t0()).is_none());
        }
        // Read after it: remembered.
        let other = Uuid::new_v4();
        sessions.remember(other, live_session(), start + ms(2), t0());
        assert!(sessions.vouch_for(other, start + ms(2), t0()).is_some());
    }

    /// A store of its own, on the shared test server.
    async fn store() -> (TestDatabase, Arc<dyn MessageStore>) {
        let database = TestDatabase::new().await;
        let store =
            message_store::connect(database.url(), message_store::ConnectOptions::default())
                .await
                .unwrap();
        (database, store)
    }

    /// Appends `messages` (type and data) to `stream` in one transaction; the last one's position.
    async fn append(store: &dyn MessageStore, stream: &str, messages: Vec<(&str, Value)>) -> u64 {
        let messages = messages
            .into_iter()
            .map(|(kind, data)| {
                NewMessage::new(kind, data).with_metadata(json!({ "schemaVersion": 1 }))
            })
            .collect();
        let stream = StreamName::parse(stream).unwrap();
        store
            .append(vec![StreamAppend::new(
                stream,
                ExpectedVersion::Any,
                messages,
            )])
            .await
            .unwrap()
            .last_global_position()
    }

    /// `id`'s logout, as the command API appends it: its type and data.
    fn logout(id: Uuid) -> (&'static str, Value) {
        let ended = SessionEvent::SessionEnded(SessionEnded {
            session_id: SessionId::from_uuid(id),
            user_id: UserId::from_uuid(Uuid::new_v4()),
            ended_at: t0(),
            reason: SessionEndReason::LoggedOut,
        });
        (ended.event_type(), ended.to_json())
    }

    fn session_stream(id: Uuid) -> String {
        session_stream_name(SessionId::from_uuid(id))
    }

    fn followed_position(sessions: &VerifiedSessions) -> Option<u64> {
        sessions
            .followed
            .read()
            .unwrap()
            .map(|followed| followed.position)
    }

    /// Waits until the store's readers see `position`: another test's open transaction on the
    /// shared server may hold them back a while (ADR 2).
    async fn visible(store: &dyn MessageStore, position: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.head_position().await.unwrap() < position {
            assert!(Instant::now() < deadline, "{position} never became visible");
            tokio::time::sleep(ms(5)).await;
        }
    }

    #[tokio::test]
    async fn the_follower_drops_each_session_it_sees_end_and_reads_up_to_the_stores_head() {
        let (_database, store) = store().await;
        let sessions = Arc::new(unfollowed(Duration::from_secs(60)));
        let mut follower = SessionEndsFollower::new(sessions.clone(), store.clone());
        let before = append(store.as_ref(), "other-1", vec![("Happened", json!({}))]).await;
        visible(store.as_ref(), before).await;
        assert_eq!(follower.step().await.unwrap(), Step::CaughtUp);
        assert_eq!(
            followed_position(&sessions),
            Some(before),
            "it starts at the head"
        );

        let (ended, refreshed) = (Uuid::now_v7(), Uuid::now_v7());
        let asked = Instant::now();
        for id in [ended, refreshed] {
            sessions.remember(id, live_session(), asked, t0());
        }
        append(store.as_ref(), &session_stream(ended), vec![logout(ended)]).await;
        // The follower reads types, not data.
        let rotation = vec![("SessionRefreshed", json!({}))];
        append(store.as_ref(), &session_stream(refreshed), rotation).await;
        // Most messages are of other categories: the position moves past them all the same.
        let last = append(store.as_ref(), "other-2", vec![("Happened", json!({}))]).await;
        visible(store.as_ref(), last).await;

        assert_eq!(follower.step().await.unwrap(), Step::CaughtUp);
        assert!(sessions.vouch_for(ended, asked, t0()).is_none());
        assert!(sessions.vouch_for(refreshed, asked, t0()).is_some());
        assert!(
            followed_position(&sessions) >= Some(last),
            "{:?} < {last}",
            followed_position(&sessions)
        );
    }

    #[tokio::test]
    async fn after_a_full_batch_the_follower_reads_on_and_moves_only_past_what_it_read() {
        let (_database, store) = store().await;
        let sessions = Arc::new(unfollowed(Duration::from_secs(60)));
        let mut follower = SessionEndsFollower::new(sessions.clone(), store.clone());
        follower.step().await.unwrap();

        let id = Uuid::now_v7();
        sessions.remember(id, live_session(), Instant::now(), t0());
        let mut messages = vec![("SessionStarted", json!({})); BATCH];
        messages.push(logout(id));
        let end = append(store.as_ref(), &session_stream(id), messages).await;
        visible(store.as_ref(), end).await;

        assert_eq!(follower.step().await.unwrap(), Step::More);
        assert!(followed_position(&sessions) < Some(end));
        assert!(sessions.lock().verified.contains_key(&id));
        assert_eq!(follower.step().await.unwrap(), Step::CaughtUp);
        assert!(followed_position(&sessions) >= Some(end));
        assert!(!sessions.lock().verified.contains_key(&id));
    }
}
