"""Call records over HTTP: ``GET /v1/calls`` and ``GET /v1/calls/{id}``, behind the API key.

I/O layer (FastAPI) over ``transceiver.store.call_log``. ``GET /v1/calls`` lists record
summaries (no turns), newest first, OpenAI-list shaped::

    {"object": "list", "data": [...], "first_id": ..., "last_id": ..., "has_more": bool,
     "next_cursor": <pass as ``after`` for the next page, or null>}

Query: ``limit`` (1-100, default 20), ``after`` (a cursor), ``since`` and ``until`` (unix
seconds, on the call's start), ``end_reason`` (e.g. ``hangup``, ``client_gone``,
``drain_hand_over``, ``taken_over``, ``error``), ``min_latency_ms`` (calls with a turn whose
voice-to-voice latency, speech stopped to first frame sent, was over it). A listing reads at
most ``call_log.MAX_SCANNED`` index entries; when a filter skipped them all it answers what it
found with ``has_more`` and a ``next_cursor`` to go on from. ``GET /v1/calls/{id}`` (a session
id, or any of its call ids) is the whole record: legs, config versions with their settings,
turns. Errors are the app's JSON errors: 401 without the API key, 400 naming a bad parameter,
404 for an unknown record (or a transceiver that keeps none: no Redis), 503 while Redis is
unreachable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from transceiver.http.errors import ApiError
from transceiver.store.call_log import MAX_LIMIT, CallRecordStore
from transceiver.store.errors import StoreError

CALL_RECORDS_PATH = "/v1/calls"
_PARAMS = ("limit", "after", "since", "until", "end_reason", "min_latency_ms")


def add_call_records(
    app: FastAPI,
    authorise: Callable[[Request], object],
    records: CallRecordStore | None,
) -> None:
    """The two routes; ``authorise`` raises the app's 401 unless the API key was sent."""

    @app.get(CALL_RECORDS_PATH)
    async def list_calls(request: Request) -> JSONResponse:
        authorise(request)
        store = _store(records)
        query = request.query_params
        unknown = sorted(set(query) - set(_PARAMS))
        if unknown:
            raise ApiError(400, "unknown_parameter", f"unknown parameter {unknown[0]!r}",
                           None, unknown[0])  # fmt: skip
        limit = int(_number(query.get("limit"), "limit", 1, MAX_LIMIT, integer=True) or 20)
        since, until = _number(query.get("since"), "since"), _number(query.get("until"), "until")
        try:
            page = await store.page(
                limit=limit,
                after=query.get("after") or None,
                since_ms=None if since is None else math.ceil(since * 1000),
                until_ms=None if until is None else math.floor(until * 1000),
                end_reason=query.get("end_reason") or None,
                min_latency_ms=_number(query.get("min_latency_ms"), "min_latency_ms"),
            )
        except StoreError as exc:
            raise _unavailable(exc) from None
        data = page.data
        body: dict[str, Any] = {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": page.has_more,
            "next_cursor": page.next_cursor,
        }
        return JSONResponse(body)

    @app.get(CALL_RECORDS_PATH + "/{record_id}")
    async def get_call(record_id: str, request: Request) -> JSONResponse:
        authorise(request)
        store = _store(records)
        try:
            record = await store.get(record_id)
        except StoreError as exc:
            raise _unavailable(exc) from None
        if record is None:
            raise ApiError(404, "call_not_found", f"no call record {record_id!r}", None, "id")
        return JSONResponse(record)


def _store(records: CallRecordStore | None) -> CallRecordStore:
    if records is None:
        raise ApiError(404, "call_records_unavailable", "this transceiver keeps no call records")
    return records


def _unavailable(exc: StoreError) -> ApiError:
    return ApiError(503, "store_unavailable", str(exc), {"Retry-After": "1"})


def _number(
    text: str | None,
    name: str,
    low: float = 0,
    high: float = math.inf,
    *,
    integer: bool = False,
) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, "invalid_type", f"{name} must be {kind}", None, name) from None
    if not low <= value <= high or math.isnan(value):
        bounds = f"at least {low:g}" if high == math.inf else f"in {low:g}..{high:g}"
        raise ApiError(400, "invalid_value", f"{name} must be {bounds}", None, name)
    return value
