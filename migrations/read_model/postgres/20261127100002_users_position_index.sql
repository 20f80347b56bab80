-- The rows a projection changed since a position: how the query API keeps the profiles it holds
-- in memory current (ADR 6).
CREATE INDEX IF NOT EXISTS users_position_idx ON users (position);
