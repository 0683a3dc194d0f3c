-- The trade each pay order opened at its gateway (pay orders of workflow version 3): which
-- gateway, and the gateway's id of the trade (Stripe: the PaymentIntent pi_...). Reads and
-- the re-drive close the trade by it. The client secret the front end needs is not kept
-- here: checkout gets it from the workflow.
ALTER TABLE pay_order ADD COLUMN gateway text, ADD COLUMN trade_ref text;
CREATE UNIQUE INDEX pay_order_trade_ref ON pay_order (gateway, trade_ref)
    WHERE trade_ref IS NOT NULL;
