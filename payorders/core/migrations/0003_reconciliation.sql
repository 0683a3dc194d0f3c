-- Reconciliation: every run and what it found, as an audit trail of checks and repairs.
CREATE TABLE reconciliation_run (
    run_id          text        PRIMARY KEY,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    period_start    timestamptz NOT NULL,
    period_end      timestamptz NOT NULL,
    checked         bigint      NOT NULL DEFAULT 0,
    consistent      bigint      NOT NULL DEFAULT 0,
    in_flight_count bigint      NOT NULL DEFAULT 0,
    money_in_flight bigint      NOT NULL DEFAULT 0,
    repaired        integer     NOT NULL DEFAULT 0,
    exceptions      integer     NOT NULL DEFAULT 0
);

CREATE TABLE reconciliation_finding (
    id           bigserial   PRIMARY KEY,
    run_id       text        NOT NULL REFERENCES reconciliation_run,
    kind         text        NOT NULL,
    action       text        NOT NULL CHECK (action IN ('REPAIRED', 'EXCEPTION')),
    pay_order_no text,
    txn_id       text,
    refund_key   text,
    amount       bigint,
    detail       text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reconciliation_finding_run ON reconciliation_finding (run_id);
-- What the checks look up: a page's refunds, and the statement period's payments and refunds.
CREATE INDEX refund_pay_order_no ON refund (pay_order_no);
CREATE INDEX payment_paid_at ON payment (paid_at);
CREATE INDEX refund_succeeded_at ON refund (succeeded_at) WHERE status = 'SUCCEEDED';
