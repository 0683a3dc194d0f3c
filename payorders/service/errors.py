"""The one error shape of both HTTP services: ``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations


class ApiError(Exception):
    """Answer ``status`` with ``{"error": {"code": code, "message": message}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
