"""The sandbox gateway, a simulator of a payment gateway: its ledger with injectable faults
and its HTTP service. Only the local stack, tests and tools use it; the product never
imports it."""
