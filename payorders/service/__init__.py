"""The service API: the FastAPI app checkout and the gateways call, webhook signature
checks, its metrics and errors."""
