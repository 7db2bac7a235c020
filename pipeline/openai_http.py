"""The providers' requests as their ``openai`` client would send them, sent by ``ProviderHTTP``.

I/O layer. ``LeanRequests.post`` sends a POST with a JSON or multipart body and answers the
response once its head has come, as ``client.post(..., cast_to=httpx2.Response, stream=True)``
does, without the SDK's and httpx's per-request work. What the SDK would put in the request
it still decides, once per kind of request: the first one's head is the SDK's own request
(``_build_request``: URL from the base URL, Authorization, OpenAI-Organization and
OpenAI-Project when set, User-Agent and the X-Stainless fields, the read timeout it announces,
httpx's Host, Accept-Encoding and Connection) kept as bytes; each request then adds its
Content-Length (and its multipart boundary). The body is what the SDK would send: JSON as
``openapi_dumps`` writes it, a form as httpx writes the SDK's fields.

Failures are the SDK's: a timeout before the head an ``openai.APITimeoutError``, another
transport failure an ``openai.APIConnectionError``, a 4xx/5xx the ``APIStatusError`` subclass
the SDK makes of it (``_make_status_error_from_response``: same class, message, JSON body,
headers such as retry-after); a failure mid-body is httpx's, as through the SDK.

No proxy is used, as none was through the SDK here: ``openai_client`` gives httpx its own
transport, and httpx then reads no proxy from the environment.

Only a client whose key is a plain string is served (``lean_requests``): an API key
provider, workload identity, a provider runtime, custom auth or default query parameters
change requests in ways the SDK does at each one, so such a client keeps the SDK's path.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
from openai._base_client import get_platform
from openai._models import FinalRequestOptions

from pipeline.http1 import FormFile, form_fields, header_lines, multipart_body
from pipeline.provider_http import Origin, ProviderHTTP, ProviderResponse, Timeouts


@dataclass(frozen=True, slots=True)
class _Template:
    """What every request of one kind sends but its body's length (and boundary)."""

    origin: Origin
    url: str
    start: bytes  # request line and the SDK's fields, without the framing ones
    timeouts: Timeouts
    fields: tuple[tuple[bytes, bytes], ...]  # the SDK's fields, framing ones left out

    def describe(self) -> httpx2.Request:
        """httpx's view of the request (the SDK's errors carry one)."""
        return httpx2.Request("POST", self.url, headers=list(self.fields))


class LeanRequests:
    """An ``openai`` client's POST requests through ``ProviderHTTP``."""

    def __init__(self, client: openai.AsyncOpenAI, http: ProviderHTTP) -> None:
        self._client, self._http = client, http
        self._templates: dict[tuple[Any, ...], _Template] = {}

    async def post(
        self,
        path: str,
        body: Mapping[str, Any],
        *,
        files: Sequence[FormFile] = (),
        headers: Mapping[str, str] | None = None,
        security: Mapping[str, bool] | None = None,
    ) -> ProviderResponse:
        """The response to a POST of ``body`` (as JSON; with ``files``, as a multipart form)."""
        key = (path, bool(files), tuple((headers or {}).items()), tuple((security or {}).items()))
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = await self._template(path, headers, security, files)
        request = _framed(template, body, files)
        try:
            response = await self._http.send(
                template.origin, request, template.timeouts, template.describe
            )
        except httpx2.TimeoutException as error:
            raise openai.APITimeoutError(request=template.describe()) from error
        except (httpx2.RequestError, ssl.SSLError) as error:
            raise openai.APIConnectionError(request=template.describe()) from error
        if response.status_code >= 400:
            raise await self._status_error(response, template)
        return response

    async def _status_error(
        self, response: ProviderResponse, template: _Template
    ) -> openai.APIStatusError:
        """The SDK's error for a 4xx/5xx answer, its body read whole."""
        content = await response.aread()
        fields = [(n, v) for n, v in response.head.fields if n not in _DECODED]
        said = httpx2.Response(
            response.status_code, headers=fields, content=content, request=template.describe()
        )
        return self._client._make_status_error_from_response(said)

    async def _template(
        self,
        path: str,
        headers: Mapping[str, str] | None,
        security: Mapping[str, bool] | None,
        files: Sequence[FormFile],
    ) -> _Template:
        """The SDK's own request of this kind, its head kept as bytes."""
        client = self._client
        if client._platform is None:  # as the SDK's request does: it may read files
            client._platform = await asyncio.to_thread(get_platform)
        options: dict[str, Any] = {"headers": dict(headers or {})}
        if security is not None:
            options["security"] = dict(security)
        sample = [("file", ("f", b"", "application/octet-stream"))] if files else None
        asked = FinalRequestOptions.construct(
            method="post", url=path, json_data={}, files=sample, **options
        )
        asked = await client._prepare_options(asked)
        request = client._build_request(asked)
        await client._prepare_request(request)
        return _template_of(request, client.timeout, form=bool(files))


# A status error's response is given its body decoded: its coding and framing fields go.
_DECODED = ("content-encoding", "transfer-encoding")


def _template_of(request: httpx2.Request, timeout: Any, *, form: bool) -> _Template:
    """The request's head without the fields each request frames itself (httpx put them
    last: Content-Length, and a form's Content-Type with its boundary)."""
    url = request.url
    framing = (b"content-length", b"content-type") if form else (b"content-length",)
    fields = tuple((n, v) for n, v in request.headers.raw if n.lower() not in framing)
    target = url.raw_path  # path and query
    start = b"POST " + target + b" HTTP/1.1\r\n" + header_lines(list(fields))
    limits = httpx2.Timeout(timeout)
    timeouts = Timeouts(limits.connect, limits.read, limits.write)
    return _Template(Origin.of(url), str(url), start, timeouts, fields)


def _framed(template: _Template, body: Mapping[str, Any], files: Sequence[FormFile]) -> bytes:
    """The whole request: the template's head, the body's framing fields, the body."""
    if files:
        boundary = os.urandom(16).hex()
        content = multipart_body(form_fields(body), list(files), boundary)
        framing = b"Content-Type: multipart/form-data; boundary=" + boundary.encode() + b"\r\n"
        length = b"Content-Length: " + str(len(content)).encode() + b"\r\n"
        return b"".join((template.start, length, framing, b"\r\n", content))
    content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    length = b"Content-Length: " + str(len(content)).encode() + b"\r\n"
    return b"".join((template.start, length, b"\r\n", content))


def plain_key(client: openai.AsyncOpenAI) -> bool:
    """Whether each request of ``client`` carries the same auth (a key that is a string)."""
    dynamic = (
        getattr(client, "_api_key_provider", None),
        getattr(client, "workload_identity", None),
        getattr(client, "_provider_runtime", None),
        client.custom_auth,
    )
    return all(value is None for value in dynamic) and not client.default_query


def lean_requests(client: openai.AsyncOpenAI) -> LeanRequests | None:
    """The lean path for ``client``'s requests: when its transport holds a ``ProviderHTTP``
    (``openai_providers.openai_client(http="lean")``) and its auth is a plain key."""
    transport = getattr(getattr(client, "_client", None), "_transport", None)
    http = getattr(transport, "lean", None)
    if not isinstance(http, ProviderHTTP) or not plain_key(client):
        return None
    return LeanRequests(client, http)
