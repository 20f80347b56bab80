-- The mails an SMTP server refused for good, on SQLite: the same table as on PostgreSQL (see
-- its migration for the meaning of each column). Times are RFC 3339 text, ids hyphenated text.
CREATE TABLE IF NOT EXISTS mail_refusals (
    message_id  TEXT    NOT NULL,
    mail_index  INTEGER NOT NULL,
    account_id  TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    reply_code  INTEGER,
    refused_at  TEXT    NOT NULL,
    PRIMARY KEY (message_id, mail_index)
);

CREATE INDEX IF NOT EXISTS mail_refusals_account_idx ON mail_refusals (account_id);
