"""The gateway port (``port``) and one module per adapter; nothing outside an adapter sees
a vendor's types or strings."""
