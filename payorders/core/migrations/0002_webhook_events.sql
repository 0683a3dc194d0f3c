-- Gateway webhooks the adapter has accepted, by the gateway's event id: a replayed or
-- retried delivery of the same event is answered 2xx without being sent again.
CREATE TABLE webhook_event (
    event_id     text        PRIMARY KEY CHECK (event_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    pay_order_no text        NOT NULL,
    txn_id       text        NOT NULL,
    outcome      text        NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_event_txn_id ON webhook_event (txn_id);
