"""The console's way to change or read anything: a call of the service's own /api/v1, in process.

A page never repeats a rule of the API: it sends the request the API would get from a client (the
browser's session cookie, the session's CSRF token, the browser's address for the audit log) straight
into the ASGI application and shows the answer. So the Authorizer, the validation, the one transaction
per request and the audit entry are exactly the API's, and a refusal is the API's refusal.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import msgspec
from litestar import Request
from litestar.types import Message

from cloud_bridge.service.auth import Principal


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return msgspec.json.decode(self.body) if self.body else None

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    @property
    def detail(self) -> str:
        try:
            body = self.json()
        except msgspec.DecodeError:
            return f"HTTP {self.status}"
        return str(body.get("detail", "")) if isinstance(body, dict) else f"HTTP {self.status}"

    @property
    def field(self) -> str | None:
        """The field the API named ("body.cards[0].card"), from `field` or a "(body.x)" in the detail."""
        body = self.json() if self.body else None
        if isinstance(body, dict) and body.get("field"):
            return str(body["field"])
        detail = self.detail
        if detail.endswith(")") and "(body." in detail:
            return detail[detail.rindex("(body.") + 1 : -1]
        return None


async def call(request: Request[Any, Any, Any], method: str, path: str, *, json: Any = None,
               query: dict[str, Any] | None = None, principal: Principal | None = None,
               content: bytes | None = None, content_type: str = "application/json") -> Answer:  # fmt: skip
    """`method path` on this application, as the browser behind `request` (its cookies, its address).
    The body is `json` encoded, or `content` as it is (of `content_type`, e.g. an uploaded CSV file)."""
    body = content if content is not None else b"" if json is None else msgspec.json.encode(json)
    headers: list[tuple[bytes, bytes]] = [(b"host", b"console.internal"), (b"content-type", content_type.encode()),
                                          (b"content-length", str(len(body)).encode())]  # fmt: skip
    if cookie := request.headers.get("cookie"):
        headers.append((b"cookie", cookie.encode("latin-1")))
    if principal is not None and principal.csrf is not None:
        headers.append((b"x-csrf-token", principal.csrf.encode()))
    q = urlencode({k: v for k, v in (query or {}).items() if v is not None and v != ""})
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": request.scope.get("scheme", "http"), "path": path, "raw_path": path.encode(),
        "query_string": q.encode(), "root_path": "", "headers": headers, "client": request.scope.get("client"),
        "server": request.scope.get("server"), "state": {}, "extensions": {},
    }  # fmt: skip
    sent = False
    status = 500
    out_headers: list[tuple[str, str]] = []
    chunks: list[bytes] = []

    async def receive() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # never: the API answers from the whole body
        raise AssertionError  # pragma: no cover

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
            out_headers.extend((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in message["headers"])
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))

    await request.app(scope, receive, send)  # type: ignore[arg-type]
    return Answer(status, out_headers, b"".join(chunks))
