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

-- Appends messages to one or more streams atomically, in one round trip.
--
-- Streams are given once each with the version the caller expects (-2 any, -1 no stream,
-- n the position of the stream's last message); messages name their stream by index into
-- p_streams (1-based). A retried append whose ids are all stored with the same stream, type and
-- data returns the stored positions instead of writing again.
--
-- Refusals are raised with SQLSTATE 'ES001' (expected version mismatch; DETAIL is
-- '<stream>\n<actual or empty>') and 'ES002' (an id already used for other content; DETAIL is
-- the id), which the Rust adapter maps to typed errors.
CREATE OR REPLACE FUNCTION append_messages(
    p_streams      text[],
    p_expected     bigint[],
    p_stream_index int[],
    p_ids          uuid[],
    p_types        text[],
    p_data         jsonb[],
    p_metadata     jsonb[]
) RETURNS TABLE (id uuid, stream_name text, "position" bigint, global_position bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_stored   int;
    v_matching int;
    v_bases    bigint[] := '{}';
    v_actual   bigint;
    v_xid      bigint;
BEGIN
    -- Writers to one stream take turns (a lock per stream, held to commit, taken in name order so
    -- that appends to several streams cannot deadlock). Writers to different streams share
    -- nothing. Each statement below reads with a fresh snapshot, so after the lock it sees the
    -- commit of the writer that held it before.
    PERFORM pg_advisory_xact_lock(hashtextextended(s.name, 0))
       FROM (SELECT DISTINCT unnest(p_streams) AS name ORDER BY 1) AS s;

    SELECT count(*), count(*) FILTER (
               WHERE m.stream_name = p_streams[r.stream_index]
                 AND m.type = r.type
                 AND m.data = r.data)
      INTO v_stored, v_matching
      FROM unnest(p_ids, p_stream_index, p_types, p_data) AS r(id, stream_index, type, data)
      JOIN messages m ON m.id = r.id;

    IF v_stored > 0 THEN
        IF v_stored = cardinality(p_ids) AND v_matching = v_stored THEN
            RETURN QUERY
                SELECT m.id, m.stream_name, m.position, m.global_position
                  FROM messages m
                 WHERE m.id = ANY (p_ids)
                 ORDER BY m.global_position;
            RETURN;
        END IF;
        RAISE EXCEPTION 'message id already used for other content'
            USING ERRCODE = 'ES002',
                  DETAIL = (SELECT r.id::text
                              FROM unnest(p_ids, p_stream_index, p_types, p_data)
                                   AS r(id, stream_index, type, data)
                              JOIN messages m ON m.id = r.id
                             WHERE m.stream_name <> p_streams[r.stream_index]
                                OR m.type <> r.type
                                OR m.data <> r.data
                                OR v_stored <> cardinality(p_ids)
                             LIMIT 1);
    END IF;

    FOR i IN 1 .. cardinality(p_streams) LOOP
        SELECT max(m.position) INTO v_actual FROM messages m WHERE m.stream_name = p_streams[i];
        IF (p_expected[i] = -1 AND v_actual IS NOT NULL)
           OR (p_expected[i] >= 0 AND v_actual IS DISTINCT FROM p_expected[i]) THEN
            RAISE EXCEPTION 'wrong expected version'
                USING ERRCODE = 'ES001',
                      DETAIL = p_streams[i] || E'\n' || coalesce(v_actual::text, '');
        END IF;
        v_bases := v_bases || (coalesce(v_actual, -1) + 1);
    END LOOP;

    v_xid := pg_current_xact_id()::text::bigint;

    RETURN QUERY
        INSERT INTO messages AS m
               (global_position, id, stream_name, category, position, type, data, metadata)
        SELECT (v_xid << 16) + r.ordinal - 1,
               r.id,
               p_streams[r.stream_index],
               split_part(p_streams[r.stream_index], '-', 1),
               v_bases[r.stream_index]
                   + row_number() OVER (PARTITION BY r.stream_index ORDER BY r.ordinal) - 1,
               r.type,
               r.data,
               r.metadata
          FROM unnest(p_ids, p_stream_index, p_types, p_data, p_metadata)
               WITH ORDINALITY AS r(id, stream_index, type, data, metadata, ordinal)
        RETURNING m.id, m.stream_name, m.position, m.global_position;
END;
$$;
