"""A strict local Alipay (API v2, what python-alipay-sdk speaks), for tests and the local
stack: ``uvicorn --factory payorders.sandbox.alipay:app``.

Its money rows are the sandbox's ledger in its own schema (``alipay_gateway``), so the
faults API and the tools that read a sandbox ledger work against it; its trades follow
Alipay's pages (each behaviour names its page). ``wire`` is the signing and the wire's
formats, ``trades`` the methods, ``server`` the HTTP service.
"""

from payorders.sandbox.alipay.server import LocalAlipayConfig, app, create_local_alipay_app
from payorders.sandbox.local import generate_key_pair

__all__ = ["LocalAlipayConfig", "app", "create_local_alipay_app", "generate_key_pair"]
