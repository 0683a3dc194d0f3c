"""Operator refunds over HTTP: money the gateway captured for a pay order we never had."""
