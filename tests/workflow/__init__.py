"""Workflows on the time-skipping test server, and saved histories replayed."""
