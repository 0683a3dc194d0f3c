"""Activities of the pay-order saga: thin, idempotent, no business rules."""
