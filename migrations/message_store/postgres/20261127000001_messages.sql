-- The message store: one append-only table of messages.
--
-- global_position encodes the writing transaction's id (xid8) in its upper bits and the message's
-- index within that transaction in its lower 16 bits. A position therefore grows with the
-- transaction id, and a reader that only reads positions below the oldest running transaction
-- (pg_snapshot_xmin) can never later meet a smaller position: see docs/adr/0002.
CREATE TABLE IF NOT EXISTS messages (
    global_position bigint      PRIMARY KEY,
    id              uuid        NOT NULL UNIQUE,
    stream_name     text        NOT NULL,
    category        text        NOT NULL,
    position        bigint      NOT NULL,
    type            text        NOT NULL,
    data            jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    time            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT messages_stream_position UNIQUE (stream_name, position)
);

CREATE INDEX IF NOT EXISTS messages_category ON messages (category, global_position);

-- The highest position a reader may safely move past: every transaction below the snapshot's
-- xmin has finished, and every transaction still running or still to start will write positions
-- at or above (xmin << 16).
CREATE OR REPLACE FUNCTION message_store_horizon() RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::bigint) << 16
$$;
