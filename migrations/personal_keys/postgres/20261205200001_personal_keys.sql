-- The key of each person whose personal fields are sealed (docs/adr/0013), wrapped under a
-- master key from the configuration, in the message store's database. The versions of this
-- migration set end in 2000NN, apart from the message store's (0000NN) and the read model's
-- (0900NN-1100NN): all of them share one _sqlx_migrations table when they share a database.
--
-- A row is either a wrapped key, naming the master key that wraps it, or a tombstone: the
-- person was erased, the key is gone, and the row stays so that no key is ever made for them
-- again.
CREATE TABLE IF NOT EXISTS personal_keys (
    person_id     uuid        PRIMARY KEY,
    wrapped_key   bytea,
    master_key_id text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    erased_at     timestamptz,
    CONSTRAINT personal_keys_key_or_tombstone CHECK (
        (wrapped_key IS NOT NULL AND master_key_id IS NOT NULL AND erased_at IS NULL)
        OR (wrapped_key IS NULL AND master_key_id IS NULL AND erased_at IS NOT NULL)
    )
);

-- Rewrapping finds the keys under other master keys than the current one, and the operator's
-- status counts keys per master key.
CREATE INDEX IF NOT EXISTS personal_keys_master_key ON personal_keys (master_key_id);
