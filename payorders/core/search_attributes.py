"""Search attributes operators filter on in the Temporal UI (no personal data in them)."""

from temporalio.common import SearchAttributeKey

PAY_ORDER_STATUS = SearchAttributeKey.for_keyword("PayOrderStatus")
ORDER_NO = SearchAttributeKey.for_keyword("OrderNo")
EXPIRES_AT = SearchAttributeKey.for_datetime("ExpiresAt")
CLOSE_REASON = SearchAttributeKey.for_keyword("CloseReason")
"""Why a pay order closed unpaid: ``EXPIRED`` (its timer) or ``CANCELLED`` (checkout);
absent while it is ``PAYING`` and when it succeeded."""

ALL = (PAY_ORDER_STATUS, ORDER_NO, EXPIRES_AT, CLOSE_REASON)
