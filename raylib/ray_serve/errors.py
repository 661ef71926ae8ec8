"""The Serve app's errors: OpenAI-shaped error bodies, per-call errors carried as values through a
batch, and the FastAPI exception handlers (a validation error is a 400, never FastAPI's 422; an
unexpected exception is a logged 500 with a JSON body)."""

import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} (OpenAI's shape)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type: str = "invalid_request_error",
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type, headers


def error_response(status: int, message: str, param: Optional[str] = None,
                   code: Optional[str] = None, type: str = "invalid_request_error",
                   headers: Optional[dict[str, str]] = None) -> JSONResponse:
    """An OpenAI-style error body (echoed input that is not valid Unicode is escaped)."""
    body = {"error": {"message": _printable(message), "type": type,
                      "param": _printable(param) if param is not None else None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _printable(text: str) -> str:
    """Text that encodes as UTF-8 (lone surrogates from a request become \\udXXX escapes)."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


INPUT_ERRORS = (ValueError, TypeError, UnicodeError)  # a bad input: 400 for its caller only


def item_error(exc: BaseException) -> dict:
    """A per-call error carried as a value (never raised into the other calls of a batch)."""
    if isinstance(exc, INPUT_ERRORS):
        return {"error": str(exc).splitlines()[-1] if str(exc) else type(exc).__name__,
                "status": 400, "code": "invalid_value"}
    if isinstance(exc, FloatingPointError):
        return {"error": str(exc), "status": 500, "code": "non_finite_output"}
    return {"error": f"internal error: {type(exc).__name__}", "status": 500,
            "code": "internal_error"}


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.type, exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI answers 422 with its own shape; OpenAI clients expect 400 + error object."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ())]
    loc = loc[1:] if loc and loc[0] in ("body", "query", "path") else loc
    param = loc[0] if loc else None  # the top-level field (deeper parts name union members)
    where = ".".join(loc)
    message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more errors)"
    code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_value"
    return error_response(400, message, param, code)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, str(exc.detail), None, code,
                          headers=getattr(exc, "headers", None))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error")
    return error_response(500, f"internal error: {type(exc).__name__}", None, "internal_error",
                          type="server_error")


def add_error_handlers(api: FastAPI) -> None:
    """Answer every error of `api` in OpenAI's shape."""
    api.add_exception_handler(APIError, _api_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(Exception, _unexpected)
