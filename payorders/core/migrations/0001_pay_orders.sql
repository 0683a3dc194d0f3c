-- The pay-order tables. Amounts are bigint minor units. The database itself refuses what
-- must never happen; the application's guarded updates are the first line, these the last.

CREATE TABLE pay_order (
    pay_order_no    text        PRIMARY KEY CHECK (pay_order_no ~ '^[A-Za-z0-9_-]{1,80}$'),
    order_no        text        NOT NULL UNIQUE CHECK (order_no ~ '^[A-Za-z0-9_-]{1,64}$'),
    amount          bigint      NOT NULL CHECK (amount > 0),
    currency        char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status          text        NOT NULL DEFAULT 'PAYING'
                                CHECK (status IN ('PAYING', 'PAY_SUCCESS', 'PAY_EXPIRED')),
    paid_amount     bigint      NOT NULL DEFAULT 0,
    refunded_amount bigint      NOT NULL DEFAULT 0,
    lock_version    integer     NOT NULL DEFAULT 0,
    expires_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pay_order_fund_bounds CHECK (0 <= refunded_amount AND refunded_amount <= paid_amount)
);
CREATE INDEX pay_order_status_expires_at ON pay_order (status, expires_at);

-- Terminal states are final, whoever writes the SQL.
CREATE FUNCTION pay_order_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'pay order % cannot be deleted', OLD.pay_order_no
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.status IN ('PAY_SUCCESS', 'PAY_EXPIRED') AND NEW.status IS DISTINCT FROM OLD.status THEN
        RAISE EXCEPTION 'pay order % is %: a terminal status cannot change', OLD.pay_order_no, OLD.status
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.pay_order_no IS DISTINCT FROM OLD.pay_order_no
       OR NEW.amount IS DISTINCT FROM OLD.amount
       OR NEW.currency IS DISTINCT FROM OLD.currency THEN
        RAISE EXCEPTION 'pay order % : number, amount and currency are immutable', OLD.pay_order_no
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER pay_order_guard BEFORE UPDATE OR DELETE ON pay_order
    FOR EACH ROW EXECUTE FUNCTION pay_order_guard();

-- One row per gateway transaction: it either settled its order or is to be refunded.
CREATE TABLE payment (
    txn_id        text        PRIMARY KEY CHECK (txn_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    pay_order_no  text        NOT NULL REFERENCES pay_order,
    amount        bigint      NOT NULL CHECK (amount > 0),
    currency      char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    paid_at       timestamptz NOT NULL,
    settled       boolean     NOT NULL,
    refund_reason text        CHECK (refund_reason IN ('LATE', 'DUPLICATE', 'AMOUNT_MISMATCH', 'CURRENCY_MISMATCH')),
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT payment_settles_or_refunds CHECK (settled = (refund_reason IS NULL))
);
CREATE INDEX payment_pay_order_no ON payment (pay_order_no);
-- At most one payment settles a pay order.
CREATE UNIQUE INDEX payment_one_settling ON payment (pay_order_no) WHERE settled;

CREATE TABLE refund (
    refund_key        text        PRIMARY KEY,
    pay_order_no      text        NOT NULL REFERENCES pay_order,
    txn_id            text        NOT NULL UNIQUE REFERENCES payment,
    amount            bigint      NOT NULL CHECK (amount > 0),
    currency          char(3)     NOT NULL,
    status            text        NOT NULL DEFAULT 'PENDING'
                                  CHECK (status IN ('PENDING', 'SUCCEEDED', 'REJECTED')),
    reason            text        NOT NULL,
    attempts          integer     NOT NULL DEFAULT 0,
    gateway_refund_id text,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    succeeded_at      timestamptz,
    CONSTRAINT refund_key_shape CHECK (refund_key = 'refund-' || pay_order_no || '-' || txn_id)
);
CREATE INDEX refund_pending ON refund (created_at) WHERE status = 'PENDING';

CREATE FUNCTION refund_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status IN ('SUCCEEDED', 'REJECTED') AND NEW.status IS DISTINCT FROM OLD.status THEN
        RAISE EXCEPTION 'refund % is %: a terminal status cannot change', OLD.refund_key, OLD.status
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER refund_guard BEFORE UPDATE ON refund FOR EACH ROW EXECUTE FUNCTION refund_guard();

-- Events for the order service, written in the transaction of the change they announce.
-- dedupe_key makes every event exactly-once even when an activity is retried.
CREATE TABLE outbox (
    id           bigserial   PRIMARY KEY,
    event_type   text        NOT NULL
                             CHECK (event_type IN ('pay_order.succeeded', 'pay_order.expired', 'refund.succeeded')),
    pay_order_no text        NOT NULL REFERENCES pay_order,
    dedupe_key   text        NOT NULL UNIQUE,
    payload      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
