"""The service API: the FastAPI app checkout and the gateways call (``app`` assembles one
router per resource), webhook signature checks, its metrics and errors; the order-events
relay."""
