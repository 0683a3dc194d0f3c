"""A strict local WeChat Pay (API v3, what ``wechatpayv3`` speaks in "WeChat Pay public key"
mode), for tests and the local stack: ``uvicorn --factory payorders.sandbox.wechatpay:app``.

Its money rows are the sandbox's ledger in its own schema (``wechatpay_gateway``), so the
faults API and the tools that read a sandbox ledger work against it; its orders and refunds
follow WeChat Pay's pages (each behaviour names its page). ``wire`` is the signing, the
encryption and the wire's formats, ``trades`` the APIs, ``server`` the HTTP service; the
frame they share with the local Alipay is ``payorders.sandbox.local``.
"""

from payorders.sandbox.local import generate_key_pair
from payorders.sandbox.wechatpay.server import (
    LocalWechatPayConfig,
    app,
    create_local_wechatpay_app,
)

__all__ = ["LocalWechatPayConfig", "app", "create_local_wechatpay_app", "generate_key_pair"]
