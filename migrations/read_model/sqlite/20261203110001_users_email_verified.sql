-- Whether the account's address is verified, 0 or 1 (see the PostgreSQL migration).
ALTER TABLE users ADD COLUMN email_verified INTEGER NOT NULL DEFAULT 0;
