"""The gateways' payment notifications over HTTP (their signatures: ``service.webhook``,
``service.stripe_webhook``)."""
