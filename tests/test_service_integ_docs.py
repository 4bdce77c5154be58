"""The example requests of docs/operator.md ("Integrations, visitors and reports") are true: each `curl` of
the block after `<!-- examples: integrations -->` is parsed out of the document and sent, as written, to a
running service (provisioning on, a simulated gateway on a real Mosquitto, both databases), and must answer
the status its `# -> NNN` line states. `(NAME=a.b)` on that line keeps a value of the answer for later
examples (`$NAME`)."""

# ruff: noqa: F811

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .broker import broker  # noqa: F401
from .mosquitto import Mosquitto
from .postgres import db_url, postgres_server  # noqa: F401
from .test_operator_e2e import GW, sock_dir  # noqa: F401
from .test_service_integ_e2e import site_with_gateway

DOC = Path(__file__).resolve().parents[1] / "docs" / "operator.md"
MARK = "<!-- examples: integrations -->"


@dataclass
class Example:
    method: str
    url: str
    headers: dict[str, str]
    body: str | None
    status: int
    keep: tuple[str, str] | None
    text: str


def examples(doc: str) -> list[Example]:
    """The curl commands of the marked block, each with the status the line before it states."""
    start = doc.index(MARK)
    begin = doc.index("```sh\n", start) + 6
    block = doc[begin : doc.index("\n```", begin)]
    out: list[Example] = []
    expect: tuple[int, tuple[str, str] | None] | None = None
    for raw in block.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if m := re.match(r"# -> (\d{3})\b(?:.*\((\w+)=([\w.]+)\))?", line):
            expect = (int(m[1]), (m[2], m[3]) if m[2] else None)
            continue
        if not line.startswith("curl "):
            assert not line or line.startswith("#"), f"not an example: {line!r}"
            continue
        assert expect is not None, f"no '# -> status' before {line!r}"
        args = shlex.split(line)[1:]
        method, headers, body, url = "GET", {}, None, ""
        i = 0
        while i < len(args):
            a = args[i]
            if a == "-X":
                method, i = args[i + 1], i + 1
            elif a == "-H":
                k, _, v = args[i + 1].partition(":")
                headers[k.strip().lower()] = v.strip()
                i += 1
            elif a == "--json":
                body, i = args[i + 1], i + 1
                headers.setdefault("content-type", "application/json")
                headers.setdefault("accept", "application/json")
                method = "POST" if method == "GET" else method
            else:
                assert not a.startswith("-"), f"option {a} is not understood by this test"
                url = a
            i += 1
        out.append(Example(method, url, headers, body, expect[0], expect[1], line))
        expect = None
    return out


def substitute(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)", lambda m: env[m[1]], text)


def dig(obj: Any, path: str) -> str:
    for part in path.split("."):
        obj = obj[part]
    return str(obj)


def test_the_block_is_found_and_parsed() -> None:
    ex = examples(DOC.read_text())
    assert len(ex) >= 15
    assert {e.method for e in ex} == {"GET", "PUT", "POST"}
    assert all("Bearer $TOKEN" in e.headers["authorization"] for e in ex)


async def test_the_documented_requests_answer_as_documented(broker: Mosquitto, db_url: str, tmp_path: Path,
                                                            sock_dir: Path) -> None:  # fmt: skip
    async with site_with_gateway(broker, db_url, tmp_path, sock_dir) as (client, _agent):
        r = await client.post("/api/v1/tokens", json={"name": "docs", "expires_days": 1})
        assert r.status_code == 201, r.text
        env = {"URL": str(client.base_url).rstrip("/"), "TOKEN": r.json()["token"]}
        async with httpx.AsyncClient(timeout=60) as http:  # no cookie: the token alone
            for e in examples(DOC.read_text()):
                resp = await http.request(e.method, substitute(e.url, env), content=e.body,
                                          headers={k: substitute(v, env) for k, v in e.headers.items()})  # fmt: skip
                assert resp.status_code == e.status, f"{e.text}\n-> {resp.status_code} {resp.text[:500]}"
                if e.keep is not None:
                    env[e.keep[0]] = dig(resp.json(), e.keep[1])
                if "/publish" in e.url:
                    assert isinstance(resp.json()["gateways"][GW], int), resp.text
