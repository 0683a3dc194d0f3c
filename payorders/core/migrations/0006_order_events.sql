-- Order events (issue 14): every outbox row is an event for the order service, delivered at
-- least once, in order per pay order, by the relay (payorders/service/relay.py), and
-- readable as a feed ordered by id (GET /v1/events).
--
-- Two orders matter, and both are fixed here, at insert, by the trigger below:
-- * `sequence`, 1, 2, 3... per pay order in commit order: the relay never sends n+1 before
--   n is acknowledged.
-- * `id`, in commit order across all pay orders: a feed reader that has seen id n never
--   later finds a row with a smaller id committed behind its back. A bigserial alone does
--   not give that (a transaction can take id 10, another 11 and commit first), so the id is
--   drawn after a transaction-scoped advisory lock that is held until commit: writers of
--   events commit one after another from their outbox insert on. Every transaction that
--   inserts an event already serialises its commit on NOTIFY's own queue lock (the NOTIFY
--   below), so this costs little more; write the outbox row last in its transaction.

-- One row per pay order: the last sequence handed out. Its row lock serialises one pay
-- order's events; the advisory lock serialises all of them.
CREATE TABLE outbox_sequence (
    pay_order_no  text    PRIMARY KEY REFERENCES pay_order,
    last_sequence integer NOT NULL CHECK (last_sequence > 0)
);

ALTER TABLE outbox
    ADD COLUMN sequence         integer,
    -- The status the event announces, fixed when it is written: PAY_SUCCESS or PAY_EXPIRED
    -- from the type; a refund announces its pay order's status at the refund's commit.
    ADD COLUMN pay_order_status text,
    -- Delivery bookkeeping, the relay's.
    ADD COLUMN attempts         integer     NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN last_error       text,
    ADD COLUMN last_attempt_at  timestamptz,
    ADD COLUMN delivered_at     timestamptz;

-- Rows written before this migration: numbered in id order (their commit order is not
-- known any more; id order is the best record of it), statuses as they stand.
UPDATE outbox o SET sequence = n.seq
  FROM (SELECT id, row_number() OVER (PARTITION BY pay_order_no ORDER BY id) AS seq
          FROM outbox) n
 WHERE o.id = n.id;
UPDATE outbox o
   SET pay_order_status = CASE o.event_type
                              WHEN 'pay_order.succeeded' THEN 'PAY_SUCCESS'
                              WHEN 'pay_order.expired' THEN 'PAY_EXPIRED'
                              ELSE p.status END
  FROM pay_order p
 WHERE p.pay_order_no = o.pay_order_no;
INSERT INTO outbox_sequence (pay_order_no, last_sequence)
SELECT pay_order_no, max(sequence) FROM outbox GROUP BY pay_order_no;

ALTER TABLE outbox
    ALTER COLUMN sequence SET NOT NULL,
    ALTER COLUMN pay_order_status SET NOT NULL,
    -- The trigger draws the id after the lock; a default would draw one before it.
    ALTER COLUMN id DROP DEFAULT,
    ADD CONSTRAINT outbox_sequence_positive CHECK (sequence > 0),
    ADD CONSTRAINT outbox_pay_order_status
        CHECK (pay_order_status IN ('PAYING', 'PAY_SUCCESS', 'PAY_EXPIRED')),
    ADD CONSTRAINT outbox_one_sequence UNIQUE (pay_order_no, sequence);

-- published_at (0001) was never written; delivered_at is the relay's acknowledgement.
DROP INDEX outbox_unpublished;
-- The relay's queue: undelivered events by due time, and each pay order's head.
CREATE INDEX outbox_undelivered_due ON outbox (next_attempt_at) WHERE delivered_at IS NULL;
CREATE INDEX outbox_undelivered_head ON outbox (pay_order_no, sequence)
    WHERE delivered_at IS NULL;

CREATE FUNCTION outbox_order_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Held to commit: ids and sequences are handed out in commit order.
    PERFORM pg_advisory_xact_lock(7306356725023814230);  -- "events" lock of payorders
    NEW.id := nextval('outbox_id_seq');
    -- An event written again (ON CONFLICT (dedupe_key) DO NOTHING will drop this row) must
    -- not use up a sequence number: the numbers stay 1, 2, 3 with no gap. Under the lock,
    -- every committed event is visible here.
    SELECT sequence INTO NEW.sequence FROM outbox WHERE dedupe_key = NEW.dedupe_key;
    IF FOUND THEN
        NEW.pay_order_status := 'PAYING';  -- the row is dropped; any valid value will do
        RETURN NEW;
    END IF;
    INSERT INTO outbox_sequence AS s (pay_order_no, last_sequence)
    VALUES (NEW.pay_order_no, 1)
    ON CONFLICT (pay_order_no) DO UPDATE SET last_sequence = s.last_sequence + 1
    RETURNING s.last_sequence INTO NEW.sequence;
    -- Never read pay_order's status for a transition: the statement that writes the event
    -- may change it in a sibling CTE, which this trigger cannot see.
    NEW.pay_order_status := CASE NEW.event_type
        WHEN 'pay_order.succeeded' THEN 'PAY_SUCCESS'
        WHEN 'pay_order.expired' THEN 'PAY_EXPIRED'
        ELSE (SELECT status FROM pay_order WHERE pay_order_no = NEW.pay_order_no) END;
    NEW.attempts := 0;
    NEW.next_attempt_at := now();
    NEW.delivered_at := NULL;
    RETURN NEW;
END $$;
CREATE TRIGGER outbox_order_event BEFORE INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_order_event();

-- Wakes the relays at commit (NOTIFY is delivered then, and not at all on rollback).
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('payorders_order_events', NEW.pay_order_no);
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_notify();
