-- Every attempt to deliver an integration event to a webhook endpoint, on SQLite: the same
-- table as on PostgreSQL (see its migration for the meaning of each column). Times are
-- RFC 3339 text, ids hyphenated text, `delivered` 0 or 1.
CREATE TABLE IF NOT EXISTS webhook_attempts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id    TEXT    NOT NULL,
    message_id    TEXT    NOT NULL,
    event_type    TEXT    NOT NULL,
    position      INTEGER NOT NULL,
    attempt       INTEGER NOT NULL,
    attempted_at  TEXT    NOT NULL,
    latency_ms    INTEGER NOT NULL,
    status_code   INTEGER,
    error         TEXT,
    delivered     INTEGER NOT NULL
);

CREATE INDEX IF NOT EXISTS webhook_attempts_endpoint_idx ON webhook_attempts (webhook_id, id DESC);
