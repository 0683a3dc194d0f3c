"""Merchant refunds over HTTP: ``/v1/pay-orders/{pay_order_no}/refunds``."""
