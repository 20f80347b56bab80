-- Whether the account's address is verified (identity::Account::email_verified): set by
-- EmailVerified and by EmailChanged (a new address is proven by the link mailed to it).
--
-- Every account of a view folded before those events existed is unverified, which is this
-- default: the users projection keeps its version (read-model-schema USERS_VERSION).
ALTER TABLE users ADD COLUMN IF NOT EXISTS email_verified boolean NOT NULL DEFAULT false;
