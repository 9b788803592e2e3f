"""API errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from http import HTTPStatus

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
         422: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request", 500: "server_error",
         503: "service_unavailable", 504: "timeout"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> dict:
        kind = TYPES.get(self.status, HTTPStatus(self.status).phrase.lower().replace(" ", "_") if self.status in HTTPStatus._value2member_map_ else "error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def too_large(message: str, param: str | None = None, code: str = "limit_exceeded") -> APIError:
    return APIError(413, message, param=param, code=code)
