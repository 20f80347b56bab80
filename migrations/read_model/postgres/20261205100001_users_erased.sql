-- Erased accounts (ADR 13): the row of an erased account stays, with status 'erased', its
-- address NULL and the time of its erasure (UserErased.at; NULL while only its data was found
-- erased, before the event was read). Its other facts (registration, activation, logins, roles,
-- session epoch) stay; its sessions' rows are deleted.
--
-- A view folded before erasures existed holds no erased account, so every row of it is right
-- with erased_at NULL: the users projection keeps its version (read-model-schema USERS_VERSION).
ALTER TABLE users ALTER COLUMN email DROP NOT NULL;
ALTER TABLE users ALTER COLUMN email_normalized DROP NOT NULL;
ALTER TABLE users ADD COLUMN IF NOT EXISTS erased_at timestamptz;
