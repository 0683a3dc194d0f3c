"""The operator tools: the ``payorders`` CLI, the demo, the torture, and the HTTP clients
and tables they use."""
