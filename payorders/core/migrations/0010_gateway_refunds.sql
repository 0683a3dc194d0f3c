-- Merchant refunds made at the gateway's dashboard (source 'gateway'), recorded when the
-- gateway notifies them or reconciliation finds them. Such a row is a fact, not a request:
-- it carries the gateway's own key (its idempotency key, or the refund's id where the
-- gateway has no key of ours), and it is inserted already REFUND_SUCCESS.
ALTER TABLE merchant_refund DROP CONSTRAINT merchant_refund_key_shape;
ALTER TABLE merchant_refund ADD CONSTRAINT merchant_refund_key_shape
    CHECK (source = 'gateway' OR idempotency_key = 'mrefund-' || refund_no);
ALTER TABLE merchant_refund ADD CONSTRAINT merchant_refund_gateway_made
    CHECK (source = 'api' OR status = 'REFUND_SUCCESS');

-- The rule of 0009, with one difference for a fact: a refund the gateway made counts only
-- against what is already refunded, not against refunds of ours still in flight (the
-- gateway decided; a refund of ours that no longer fits is then refused by the gateway and
-- ends REFUND_FAILED).
CREATE OR REPLACE FUNCTION merchant_refund_within_amount() RETURNS trigger LANGUAGE plpgsql AS $$
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
     WHERE pay_order_no = NEW.pay_order_no
       AND (status = 'REFUND_SUCCESS' OR (status = 'REFUNDING' AND NEW.source = 'api'));
    IF committed + NEW.amount > o.amount THEN
        RAISE EXCEPTION 'refund % of % would take pay order % past its amount % (% refunded or in flight)',
            NEW.refund_no, NEW.amount, NEW.pay_order_no, o.amount, committed
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
