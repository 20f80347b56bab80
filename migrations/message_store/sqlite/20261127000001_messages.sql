-- The message store on SQLite. One writer at a time (SQLite serialises writes), so positions
-- from AUTOINCREMENT commit in order and readers need no horizon.
CREATE TABLE IF NOT EXISTS messages (
    global_position INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT    NOT NULL UNIQUE,
    stream_name     TEXT    NOT NULL,
    category        TEXT    NOT NULL,
    position        INTEGER NOT NULL,
    type            TEXT    NOT NULL,
    data            TEXT    NOT NULL,
    metadata        TEXT    NOT NULL DEFAULT '{}',
    time            TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (stream_name, position)
);

CREATE INDEX IF NOT EXISTS messages_category ON messages (category, global_position);
