-- The sessions view (ADR 11): one row per session, kept by the users projection in the same
-- transactions and under the same checkpoint as the users view.
--
-- A session is live while ended_at is NULL, it is before both its limits, and its
-- session_epoch is its account's (users.session_epoch): a deactivation, a password change or an
-- administrator ending them all moves the account's epoch and ends every earlier session at
-- once, without a write to each.

CREATE TABLE IF NOT EXISTS sessions (
    id                uuid        PRIMARY KEY,
    user_id           uuid        NOT NULL,
    -- The account's session epoch the session belongs to: once the account moves past it
    -- (a deactivation, a password change, an administrator ending them all), the session ends.
    session_epoch     bigint      NOT NULL,
    started_at        timestamptz NOT NULL,
    -- The last rotation of its refresh token; NULL until the first.
    last_refreshed_at timestamptz,
    -- The absolute limit, and the idle limit that each refresh moves.
    expires_at        timestamptz NOT NULL,
    idle_expires_at   timestamptz NOT NULL,
    user_agent        text,
    -- The generation of its current refresh token.
    generation        bigint      NOT NULL,
    ended_at          timestamptz,
    -- logged_out | ended_by_owner | ended_by_administrator | refresh_token_reused |
    -- account_deactivated | password_changed
    end_reason        text,
    -- The global position of the last event applied to this row.
    position          bigint      NOT NULL
);

-- A user's sessions, newest first.
CREATE INDEX IF NOT EXISTS sessions_user_started_idx ON sessions (user_id, started_at DESC);

-- The account's session epoch (see shared/identity, Account::session_epoch).
ALTER TABLE users ADD COLUMN IF NOT EXISTS session_epoch bigint NOT NULL DEFAULT 0;
