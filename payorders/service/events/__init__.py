"""Order events: their body and the pull feed (``feed``, the relay pushes the same bodies),
and the feed's route (``endpoints``)."""
