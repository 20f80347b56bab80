-- The read model on SQLite: the same tables as on PostgreSQL (see aggregator/src/read_model.rs).
-- Times are RFC 3339 text, ids hyphenated text, roles a JSON array of strings.

CREATE TABLE IF NOT EXISTS projection_checkpoints (
    projection TEXT    PRIMARY KEY,
    version    INTEGER NOT NULL,
    position   INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE IF NOT EXISTS users (
    id               TEXT    PRIMARY KEY,
    email            TEXT    NOT NULL,
    email_normalized TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    registered_at    TEXT    NOT NULL,
    activated_at     TEXT,
    deactivated_at   TEXT,
    last_login_at    TEXT,
    login_count      INTEGER NOT NULL DEFAULT 0,
    failed_logins    INTEGER NOT NULL DEFAULT 0,
    locked_until     TEXT,
    roles            TEXT    NOT NULL DEFAULT '[]',
    position         INTEGER NOT NULL
);

CREATE INDEX IF NOT EXISTS users_email_normalized_idx ON users (email_normalized);
CREATE INDEX IF NOT EXISTS users_status_id_idx ON users (status, id);
