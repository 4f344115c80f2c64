"""The HTTP surface of serving: request and response bodies (pydantic, strict) and the 422 answers
that name the bad field (``k``, ``filters.item_genres``, ``history[2]``, ``body`` for malformed JSON)."""

from __future__ import annotations

import json
import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from trec.serving.requests import RequestError


class RecommendBody(BaseModel):
    """POST /recommend (see :class:`~trec.serving.requests.RecommendRequest`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: str | int
    k: int = 10
    exclude_seen: bool = True
    history: list[str | int] | None = None
    user_features: dict[str, str | list[str | int] | float] | None = None
    context: dict[str, str | int] | None = None
    filters: dict[str, list[str | int]] | None = None
    rerank: bool | None = None
    candidates: int = 100


class ItemOut(BaseModel):
    item_id: str
    title: str | None
    score: float
    rank: int


class RecommendOut(BaseModel):
    items: list[ItemOut]
    source: str
    model_version: str
    route: str
    unknown_history: int
    stage: str
    version: str | None = None
    """The published version that answered (serving a --model-root), else null."""
    arm: str | None = None
    """The experiment arm that answered (absent without an experiment)."""


class FeedbackBody(BaseModel):
    """POST /feedback: one event of a user on an item."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: str | int
    item_id: str | int
    event: str
    """One of the server's event labels (purchase, like, click, view, dislike by default)."""
    timestamp: int | None = None
    """Unix seconds (default: now)."""
    context: dict[str, str | int] | None = None


class FeedbackOut(BaseModel):
    label: float
    positive: bool
    logged: bool
    history_length: int | None
    arm: str | None


class SimilarOut(BaseModel):
    item_id: str
    items: list[ItemOut]
    model_version: str


class ErrorOut(BaseModel):
    field: str
    message: str
    detail: list[dict]


ERRORS = {422: {"model": ErrorOut, "description": "a bad request, naming its field"}}


def json_response(content: object, status: int = 200) -> Response:
    return Response(json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(),
                    status_code=status, media_type="application/json")


def _unprocessable(field: str, message: str, detail: list[dict]) -> Response:
    return json_response({"field": field, "message": f"{field}: {message}", "detail": detail}, 422)


async def request_error(request: Request, error: RequestError) -> Response:
    where = ("query" if error.field == "k" else "path") if request.method == "GET" else "body"
    return _unprocessable(error.field, error.message,
                          [{"loc": [where, *error.field.split(".")], "msg": error.message, "type": "value_error"}])


# Union members pydantic appends to an error's location (``user_id.str``, ``history.0.int``).
_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\])$")


async def validation_error(request: Request, error: RequestValidationError) -> Response:
    errors = error.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", first.get("msg"))
        return _unprocessable("body", f"malformed JSON ({reason})", [_plain(first)])
    field, message = _field(first.get("loc", ())), str(first.get("msg"))
    if field == "body" and first.get("type") == "model_attributes_type":
        message = "expected a JSON object (send Content-Type: application/json)"
    return _unprocessable(field, message, [_plain(e) for e in errors[:10]])


def _field(loc: tuple) -> str:
    """``("body", "filters", "item_genres", 0, "str")`` -> ``filters.item_genres[0]``."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
    while parts and isinstance(parts[-1], str) and _UNION_TAG.match(parts[-1]):
        parts.pop()
    field = ""
    for part in parts:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    return field or (str(loc[0]) if loc else "body")


def _plain(error: dict) -> dict:
    return {"loc": [str(part) if not isinstance(part, int) else part for part in error.get("loc", ())],
            "msg": str(error.get("msg")), "type": str(error.get("type"))}
