-- Fencing for takeover (docs/adr/0008): each worker that takes a projection's lock bumps its
-- checkpoint's epoch, and every batch commit compares it together with the position and the
-- version, so a worker that lost the lock writes nothing, even over a connection that heals.
ALTER TABLE projection_checkpoints ADD COLUMN IF NOT EXISTS epoch bigint NOT NULL DEFAULT 0;
