-- Erased accounts on SQLite (see the PostgreSQL migration): email and email_normalized become
-- nullable and erased_at is added. SQLite cannot drop a NOT NULL constraint, so the table is
-- made again with the same columns and its rows copied, and every index of it is created again
-- under its name (the migrations run in one transaction: a failure leaves the old table).
CREATE TABLE users_erasable (
    id               TEXT    PRIMARY KEY,
    email            TEXT,
    email_normalized TEXT,
    status           TEXT    NOT NULL,
    registered_at    TEXT    NOT NULL,
    activated_at     TEXT,
    deactivated_at   TEXT,
    last_login_at    TEXT,
    login_count      INTEGER NOT NULL DEFAULT 0,
    failed_logins    INTEGER NOT NULL DEFAULT 0,
    locked_until     TEXT,
    roles            TEXT    NOT NULL DEFAULT '[]',
    position         INTEGER NOT NULL,
    session_epoch    INTEGER NOT NULL DEFAULT 0,
    email_verified   INTEGER NOT NULL DEFAULT 0,
    erased_at        TEXT
);

INSERT INTO users_erasable (id, email, email_normalized, status, registered_at, activated_at,
                            deactivated_at, last_login_at, login_count, failed_logins,
                            locked_until, roles, position, session_epoch, email_verified)
SELECT id, email, email_normalized, status, registered_at, activated_at, deactivated_at,
       last_login_at, login_count, failed_logins, locked_until, roles, position, session_epoch,
       email_verified
  FROM users;

DROP TABLE users;
ALTER TABLE users_erasable RENAME TO users;

CREATE INDEX users_email_normalized_idx ON users (email_normalized);
CREATE INDEX users_status_id_idx ON users (status, id);
CREATE INDEX users_position_idx ON users (position);
