-- The read model: the users view and the projections' checkpoints (see aggregator/src/read_model.rs).
--
-- A projection writes its rows and its checkpoint in one transaction, so the checkpoint says
-- exactly which events the view holds.

CREATE TABLE IF NOT EXISTS projection_checkpoints (
    projection text        PRIMARY KEY,
    -- The projection's version when the rows were written; a new version needs a rebuild.
    version    integer     NOT NULL,
    -- The global position of the last message the projection has taken into account.
    position   bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS users (
    id               uuid        PRIMARY KEY,
    email            text        NOT NULL,
    email_normalized text        NOT NULL,
    -- pending | active | deactivated
    status           text        NOT NULL,
    registered_at    timestamptz NOT NULL,
    activated_at     timestamptz,
    deactivated_at   timestamptz,
    last_login_at    timestamptz,
    login_count      bigint      NOT NULL DEFAULT 0,
    -- Failed logins since the last successful one.
    failed_logins    integer     NOT NULL DEFAULT 0,
    locked_until     timestamptz,
    roles            text[]      NOT NULL DEFAULT '{}',
    -- The global position of the last event applied to this row.
    position         bigint      NOT NULL
);

-- Lookup by email. Not unique: uniqueness is decided on the command side; a view that refused a
-- row would stop the projection instead.
CREATE INDEX IF NOT EXISTS users_email_normalized_idx ON users (email_normalized);
-- Listing by status, paged by id.
CREATE INDEX IF NOT EXISTS users_status_id_idx ON users (status, id);
