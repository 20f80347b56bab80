-- The sessions view on SQLite: the same table as on PostgreSQL (see its migration for the
-- meaning of each column). Times are RFC 3339 text, ids hyphenated text.

CREATE TABLE IF NOT EXISTS sessions (
    id                TEXT    PRIMARY KEY,
    user_id           TEXT    NOT NULL,
    session_epoch     INTEGER NOT NULL,
    started_at        TEXT    NOT NULL,
    last_refreshed_at TEXT,
    expires_at        TEXT    NOT NULL,
    idle_expires_at   TEXT    NOT NULL,
    user_agent        TEXT,
    generation        INTEGER NOT NULL,
    ended_at          TEXT,
    end_reason        TEXT,
    position          INTEGER NOT NULL
);

CREATE INDEX IF NOT EXISTS sessions_user_started_idx ON sessions (user_id, started_at DESC);

ALTER TABLE users ADD COLUMN session_epoch INTEGER NOT NULL DEFAULT 0;
