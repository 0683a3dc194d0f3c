-- Who asked, by the name of the API token a request was made with (never the token;
-- DESIGN.md "Who may do what"). Both null for rows written before this migration.

-- Who asked for an operator refund: written with the row by the request that opens it.
ALTER TABLE operator_refund ADD COLUMN requested_by text
    CHECK (requested_by ~ '^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$');

-- Who asked to cancel a pay order: the first caller to ask while it was PAYING (the API
-- writes it before it asks the workflow, with a guarded update). Kept whatever the outcome,
-- PAY_EXPIRED/CANCELLED or PAY_SUCCESS when the gateway answered "already paid"; null when
-- nobody asked (or the cancel came before the workflow had written the row). No status or
-- lock_version moves with it, so pay_order_guard lets it through and stamps updated_at.
ALTER TABLE pay_order ADD COLUMN cancel_requested_by text
    CHECK (cancel_requested_by ~ '^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$');
