-- Global positions that stay above every stored one whatever the cluster's transaction counter
-- (docs/adr/0007).
--
-- A position is (transaction id + offset) << 16 + index. The offset is 0 on a store that has
-- only ever lived in one cluster. A cluster made by pg_dump/pg_restore or by logical
-- replication starts its transaction counter far below the ids the stored positions were drawn
-- from; message_store_advance_offset(), run at every start and by `migrate`, raises the offset
-- so that the next transaction's positions lie above the largest stored one. Appends refuse to
-- write while that does not hold (message_store_positions_behind()).

CREATE TABLE IF NOT EXISTS message_store_position_offset (
    -- One row: the key only makes the table replicable (logical replication needs one).
    only_row     boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    transactions bigint  NOT NULL CHECK (transactions >= 0)
);

INSERT INTO message_store_position_offset (transactions) VALUES (0) ON CONFLICT DO NOTHING;

-- The highest position a reader may safely move past: every transaction below the snapshot's
-- xmin has finished, and every transaction still running or still to start will write positions
-- at or above ((xmin + offset) << 16).
CREATE OR REPLACE FUNCTION message_store_horizon() RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::bigint
            + (SELECT transactions FROM message_store_position_offset)) << 16
$$;

-- The first position the current transaction writes (its messages add their index to it).
CREATE OR REPLACE FUNCTION message_store_position_base() RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT (pg_current_xact_id()::text::bigint
            + (SELECT transactions FROM message_store_position_offset)) << 16
$$;

-- The lowest position a transaction that starts from now on can write. Every stored position
-- must lie below it; one that does not means the transaction counter is behind the store.
CREATE OR REPLACE FUNCTION message_store_position_floor() RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT (pg_snapshot_xmax(pg_current_snapshot())::text::bigint
            + (SELECT transactions FROM message_store_position_offset)) << 16
$$;

-- Raises the offset, if it must, so that every transaction from now on writes above the
-- largest stored position, and returns the offset. Serialised by the table lock, so two
-- processes starting at once raise it once; appends only read the table and are not blocked.
--
-- When it raises it, it adds a margin of 2^32 transactions: a consumer on another server (a read
-- model newer than the restored dump) may have seen positions the copied store never held, and
-- new messages must land above those too, or that consumer would pass them by. Positions have
-- room for 2^15 such jumps.
CREATE OR REPLACE FUNCTION message_store_advance_offset() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    current_offset bigint;
    largest        bigint;
    needed         bigint;
BEGIN
    LOCK TABLE message_store_position_offset IN EXCLUSIVE MODE;
    SELECT transactions INTO current_offset FROM message_store_position_offset;
    SELECT max(global_position) INTO largest FROM messages;
    needed := (coalesce(largest, -1) >> 16) + 1
              - pg_snapshot_xmax(pg_current_snapshot())::text::bigint;
    IF needed > current_offset THEN
        needed := needed + (1::bigint << 32);
        UPDATE message_store_position_offset SET transactions = needed;
        RETURN needed;
    END IF;
    RETURN current_offset;
END
$$;
