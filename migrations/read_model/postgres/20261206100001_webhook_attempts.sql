-- Every attempt to deliver an integration event to a webhook endpoint, kept by the webhook
-- delivery in the aggregator (aggregator/src/webhooks) and shown by the query API's
-- `GET /webhooks/{id}/deliveries`: the endpoint, the event's message id (its `webhook-id`
-- header), type and global position, the attempt's number for that event (1 for the first),
-- when it began and how long it took, the receiver's status code (null: no answer: refused,
-- timed out, or an address the network policy forbids), what went wrong in a few words, and
-- whether it counted as delivered. The delivery keeps the newest `webhooks.attempts_kept` per
-- endpoint. No body and no header: what was sent is the event, rebuilt from the store.
CREATE TABLE IF NOT EXISTS webhook_attempts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id    uuid        NOT NULL,
    message_id    uuid        NOT NULL,
    event_type    text        NOT NULL,
    position      bigint      NOT NULL,
    attempt       integer     NOT NULL,
    attempted_at  timestamptz NOT NULL,
    latency_ms    integer     NOT NULL,
    status_code   integer,
    error         text,
    delivered     boolean     NOT NULL
);

CREATE INDEX IF NOT EXISTS webhook_attempts_endpoint_idx ON webhook_attempts (webhook_id, id DESC);
