-- The mails an SMTP server refused for good (5xx), one row per mail, kept by the mailer
-- (aggregator/src/mailer): the event's message id and the mail's index among that event's
-- mails (its Message-ID is <message_id.mail_index@domain>), the account, the kind of mail,
-- the server's reply code (null: the address could not even be written into an envelope) and
-- when. No address: the event in the message store has it, and logs never do.
CREATE TABLE IF NOT EXISTS mail_refusals (
    message_id  uuid        NOT NULL,
    mail_index  smallint    NOT NULL,
    account_id  uuid        NOT NULL,
    kind        text        NOT NULL,
    reply_code  integer,
    refused_at  timestamptz NOT NULL,
    PRIMARY KEY (message_id, mail_index)
);

CREATE INDEX IF NOT EXISTS mail_refusals_account_idx ON mail_refusals (account_id);
