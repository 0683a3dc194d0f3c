"""Order events: their body (``feed``), pushed by the relay and read from the pull feed."""
