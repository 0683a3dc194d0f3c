"""Workflows of the pay-order saga."""
