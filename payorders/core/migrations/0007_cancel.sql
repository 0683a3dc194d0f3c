-- Why a pay order closed unpaid: EXPIRED (its payment window ran out) or CANCELLED
-- (checkout cancelled it). Set exactly when the order becomes PAY_EXPIRED, never changed
-- after; null while PAYING and on PAY_SUCCESS.
ALTER TABLE pay_order ADD COLUMN close_reason text
    CHECK (close_reason IN ('EXPIRED', 'CANCELLED'));

-- Orders that expired before this migration expired by their timer (there was no cancel).
-- The backfill is no change of the order: pay_order_guard would stamp updated_at, so it is
-- off for this one statement (the migration holds the table's lock throughout).
ALTER TABLE pay_order DISABLE TRIGGER pay_order_guard;
UPDATE pay_order SET close_reason = 'EXPIRED' WHERE status = 'PAY_EXPIRED';
ALTER TABLE pay_order ENABLE TRIGGER pay_order_guard;

ALTER TABLE pay_order ADD CONSTRAINT pay_order_close_reason_when_expired
    CHECK ((status = 'PAY_EXPIRED') = (close_reason IS NOT NULL));

-- A writer that expires an order without saying why (an operator's SQL, a seed script)
-- means the timer's expiry; once set, the reason is as final as the status.
CREATE FUNCTION pay_order_close_reason() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.close_reason IS NOT NULL
       AND NEW.close_reason IS DISTINCT FROM OLD.close_reason THEN
        RAISE EXCEPTION 'pay order % closed %: its close reason cannot change', OLD.pay_order_no, OLD.close_reason
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.status = 'PAY_EXPIRED' AND NEW.close_reason IS NULL THEN
        NEW.close_reason := 'EXPIRED';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER pay_order_close_reason BEFORE INSERT OR UPDATE ON pay_order
    FOR EACH ROW EXECUTE FUNCTION pay_order_close_reason();
