-- Merchant refunds: money a shop gives back after PAY_SUCCESS (a return, a goodwill credit),
-- by the original route, keyed by the shop's own refund_no. They are not compensations:
-- they never count in pay_order.refunded_amount (DESIGN.md, "The fund identity").
CREATE TABLE merchant_refund (
    -- The shop's key: the same refund_no is the same refund, whoever sends it again. At
    -- most 48 characters, so the gateway key 'mrefund-' || refund_no fits the 64 that
    -- Alipay's out_request_no and WeChat Pay's out_refund_no take.
    refund_no         text        PRIMARY KEY CHECK (refund_no ~ '^[A-Za-z0-9_-]{1,48}$'),
    pay_order_no      text        NOT NULL REFERENCES pay_order,
    -- The settling payment: the original route the money goes back by.
    txn_id            text        NOT NULL REFERENCES payment,
    amount            bigint      NOT NULL CHECK (amount > 0),
    currency          char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    reason            text        CHECK (length(reason) <= 500),
    requested_by      text        CHECK (requested_by ~ '^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$'),
    -- api: asked through our API; gateway: made at the gateway's dashboard, recorded here.
    source            text        NOT NULL DEFAULT 'api' CHECK (source IN ('api', 'gateway')),
    idempotency_key   text        NOT NULL UNIQUE,
    status            text        NOT NULL DEFAULT 'REFUNDING'
                                  CHECK (status IN ('REFUNDING', 'REFUND_SUCCESS', 'REFUND_FAILED')),
    attempts          integer     NOT NULL DEFAULT 0,
    gateway_refund_id text        UNIQUE,
    failure_reason    text,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    CONSTRAINT merchant_refund_key_shape CHECK (idempotency_key = 'mrefund-' || refund_no),
    CONSTRAINT merchant_refund_succeeded
        CHECK (status <> 'REFUND_SUCCESS' OR (gateway_refund_id IS NOT NULL AND finished_at IS NOT NULL)),
    CONSTRAINT merchant_refund_failed
        CHECK (status <> 'REFUND_FAILED' OR (failure_reason IS NOT NULL AND finished_at IS NOT NULL))
);
CREATE INDEX merchant_refund_of ON merchant_refund (pay_order_no, created_at);
CREATE INDEX merchant_refund_in_flight ON merchant_refund (created_at) WHERE status = 'REFUNDING';

-- The one writer, in the database itself: an insert takes the pay order's row lock, so two
-- refunds of one pay order are decided one after the other, in any process, and together
-- never exceed what was captured. The API takes the same lock first (and says why it
-- refuses); this is the rule that holds whatever writes.
CREATE FUNCTION merchant_refund_within_amount() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    o pay_order%ROWTYPE;
    committed bigint;
BEGIN
    SELECT * INTO o FROM pay_order WHERE pay_order_no = NEW.pay_order_no FOR UPDATE;
    IF o.status IS DISTINCT FROM 'PAY_SUCCESS' THEN
        RAISE EXCEPTION 'pay order % is %: only a paid order is refunded', NEW.pay_order_no, o.status
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.currency <> o.currency THEN
        RAISE EXCEPTION 'refund % is in %, pay order % in %', NEW.refund_no, NEW.currency,
            NEW.pay_order_no, o.currency USING ERRCODE = 'check_violation';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM payment
                    WHERE txn_id = NEW.txn_id AND pay_order_no = NEW.pay_order_no AND settled) THEN
        RAISE EXCEPTION 'refund % must go back by the payment that settled %', NEW.refund_no,
            NEW.pay_order_no USING ERRCODE = 'check_violation';
    END IF;
    SELECT COALESCE(sum(amount), 0) INTO committed FROM merchant_refund
     WHERE pay_order_no = NEW.pay_order_no AND status <> 'REFUND_FAILED';
    IF committed + NEW.amount > o.amount THEN
        RAISE EXCEPTION 'refund % of % would take pay order % past its amount % (% refunded or in flight)',
            NEW.refund_no, NEW.amount, NEW.pay_order_no, o.amount, committed
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER merchant_refund_within_amount BEFORE INSERT ON merchant_refund
    FOR EACH ROW EXECUTE FUNCTION merchant_refund_within_amount();

-- A finished refund is final; what was asked for never changes.
CREATE FUNCTION merchant_refund_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'merchant refund % cannot be deleted', OLD.refund_no
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.status IN ('REFUND_SUCCESS', 'REFUND_FAILED') AND NEW.status IS DISTINCT FROM OLD.status THEN
        RAISE EXCEPTION 'merchant refund % is %: a terminal status cannot change', OLD.refund_no, OLD.status
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF (NEW.refund_no, NEW.pay_order_no, NEW.txn_id, NEW.amount, NEW.currency, NEW.source)
       IS DISTINCT FROM (OLD.refund_no, OLD.pay_order_no, OLD.txn_id, OLD.amount, OLD.currency, OLD.source) THEN
        RAISE EXCEPTION 'merchant refund %: what was asked for cannot change', OLD.refund_no
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER merchant_refund_guard BEFORE UPDATE OR DELETE ON merchant_refund
    FOR EACH ROW EXECUTE FUNCTION merchant_refund_guard();

-- Their events: refund.succeeded (as for a compensation, with data.refund.refund_no) and
-- refund.failed (a merchant refund the gateway finally refused).
ALTER TABLE outbox DROP CONSTRAINT outbox_event_type_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_event_type_check
    CHECK (event_type IN ('pay_order.succeeded', 'pay_order.expired', 'refund.succeeded', 'refund.failed'));
