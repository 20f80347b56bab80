-- Fencing for takeover (docs/adr/0008), as on PostgreSQL. The standalone mode runs one worker
-- and never bumps it, but the commit compares it the same way.
ALTER TABLE projection_checkpoints ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
