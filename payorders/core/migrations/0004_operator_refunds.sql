-- Operator refunds: money the gateway captured for a pay order we never had (reconciliation's
-- money_without_order) goes back when an operator asks (`payorders refund --txn`). No pay
-- order holds such a payment, so it cannot be a payment or refund row (both reference
-- pay_order): it has a row of its own, shaped and guarded like a refund, keyed by the same
-- idempotency key, refund-{the gateway's pay order number}-{txn_id}.
CREATE TABLE operator_refund (
    refund_key        text        PRIMARY KEY,
    txn_id            text        NOT NULL UNIQUE CHECK (txn_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    -- The capture's pay order number at the gateway; no pay_order row of ours has it.
    pay_order_no      text        NOT NULL CHECK (pay_order_no ~ '^[A-Za-z0-9_-]{1,80}$'),
    amount            bigint      NOT NULL CHECK (amount > 0),
    currency          char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    captured_at       timestamptz NOT NULL,
    status            text        NOT NULL DEFAULT 'PENDING'
                                  CHECK (status IN ('PENDING', 'SUCCEEDED', 'REJECTED')),
    attempts          integer     NOT NULL DEFAULT 0,
    gateway_refund_id text,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    succeeded_at      timestamptz,
    CONSTRAINT operator_refund_key_shape
        CHECK (refund_key = 'refund-' || pay_order_no || '-' || txn_id),
    CONSTRAINT operator_refund_confirmed
        CHECK (status <> 'SUCCEEDED' OR (gateway_refund_id IS NOT NULL AND succeeded_at IS NOT NULL))
);
CREATE INDEX operator_refund_pending ON operator_refund (created_at) WHERE status = 'PENDING';
CREATE INDEX operator_refund_succeeded_at ON operator_refund (succeeded_at)
    WHERE status = 'SUCCEEDED';

-- A terminal refund status is final here too (the same rule as refund's).
CREATE TRIGGER operator_refund_guard BEFORE UPDATE ON operator_refund
    FOR EACH ROW EXECUTE FUNCTION refund_guard();

-- A transaction is refunded once, whoever asks: a payment of one of our pay orders is
-- settled or refunded by its pay order, never by an operator, and a transaction an
-- operator refunded can never be recorded as a pay order's payment (it would settle an
-- order with money already given back). Two tables, so triggers instead of one unique key;
-- the application takes a SHARE lock on payment before it opens an operator refund, so the
-- two checks cannot pass concurrently.
CREATE FUNCTION operator_refund_not_a_payment() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM payment WHERE txn_id = NEW.txn_id) THEN
        RAISE EXCEPTION 'transaction % is a payment of a pay order here: its pay order settles or refunds it', NEW.txn_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER operator_refund_not_a_payment BEFORE INSERT OR UPDATE OF txn_id ON operator_refund
    FOR EACH ROW EXECUTE FUNCTION operator_refund_not_a_payment();

CREATE FUNCTION payment_not_operator_refunded() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM operator_refund WHERE txn_id = NEW.txn_id) THEN
        RAISE EXCEPTION 'transaction % was refunded by an operator: no pay order may record it', NEW.txn_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER payment_not_operator_refunded BEFORE INSERT OR UPDATE OF txn_id ON payment
    FOR EACH ROW EXECUTE FUNCTION payment_not_operator_refunded();

-- Reconciliation reports such a capture, once refunded, as RESOLVED: neither repaired by the
-- run nor an exception left for a person.
ALTER TABLE reconciliation_finding DROP CONSTRAINT reconciliation_finding_action_check;
ALTER TABLE reconciliation_finding ADD CONSTRAINT reconciliation_finding_action_check
    CHECK (action IN ('REPAIRED', 'EXCEPTION', 'RESOLVED'));
