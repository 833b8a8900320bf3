"""The documentation cannot drift: docs/configuration.md is the generated text, .env.example names every
variable, the Postman collection covers exactly the app's routes, and the example scripts run against a real
service and do what they say."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import pytest

from quart_sse import docgen
from quart_sse.app import create_app
from quart_sse.settings import Settings
from tests.support import ROOT, SECRET, auth, live_server, make_settings, open_stream, token

EXAMPLES = ROOT / "docs" / "examples"
COLLECTION = EXAMPLES / "sse_notification_service.postman_collection.json"


# ------------------------------------------------------------------------------------------------ configuration
def test_configuration_md_is_the_generated_text() -> None:
    assert docgen.DOC_PATH == ROOT / "docs" / "configuration.md"
    assert docgen.DOC_PATH.read_text(encoding="utf-8") == docgen.render(), \
        "docs/configuration.md is stale: run python -m quart_sse.docgen --write"


def test_every_setting_is_documented_in_the_table() -> None:
    text = docgen.render()
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name}: add description= to its Field() in quart_sse/settings.py"
        assert f"| `{name.upper()}` |" in text
    assert "| `JWT_SECRET` | secret | **required** |" in text
    assert "| `APP_PORT` | int (≥ 1, ≤ 65535) | `8080` |" in text
    assert "| `APP_MODE` | `debug` \\| `production` | `debug` |" in text


def test_docgen_check_flags_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert docgen.main(["--check"]) == 0
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    monkeypatch.setattr(docgen, "DOC_PATH", stale)
    assert docgen.main(["--check"]) == 1
    assert docgen.main(["--write"]) == 0 and stale.read_text() == docgen.render()


def test_env_example_mentions_every_variable() -> None:
    text = (ROOT / ".env.example").read_text()
    named = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, flags=re.M))
    missing = set(docgen.env_names()) - named
    assert not missing, f".env.example does not mention {sorted(missing)}"
    assert not named - set(docgen.env_names()), "it names variables the service does not read"


# ------------------------------------------------------------------------------------------------ nginx
def test_nginx_guide_covers_what_streams_need() -> None:
    text = (ROOT / "docs" / "operations-nginx.md").read_text()
    config = "\n".join(re.findall(r"```nginx\n(.*?)```", text, flags=re.S))
    assert "proxy_buffering off;" in config and "gzip off;" in config and "proxy_http_version 1.1;" in config
    timeouts = [int(s) for s in re.findall(r"proxy_read_timeout (\d+)s;", config)]
    assert timeouts and min(timeouts) > Settings.model_fields["ping_interval"].default
    assert "http2 on;" in config
    assert "six connections per host" in text.lower().replace("-", " ")


# ------------------------------------------------------------------------------------------------ Postman
def _requests(items: list[dict[str, object]]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for item in items:
        if "item" in item:
            out += _requests(item["item"])  # type: ignore[arg-type]
        else:
            out.append(item["request"])  # type: ignore[arg-type]
    return out


def test_postman_collection_covers_exactly_the_routes() -> None:
    coll = json.loads(COLLECTION.read_text())
    assert coll["info"]["schema"].endswith("/collection/v2.1.0/collection.json")
    variables = {v["key"]: v["value"] for v in coll["variable"]}
    adapter = create_app(make_settings(app_mode="debug")).url_map.bind("localhost")
    seen = set()
    for req in _requests(coll["item"]):
        raw = req["url"]["raw"]  # type: ignore[index]
        assert raw.startswith("{{base_url}}/")
        path = re.sub(r"\{\{(\w+)\}\}", lambda m: variables.get(m.group(1)) or "x", raw[len("{{base_url}}"):])
        endpoint, _ = adapter.match(path.split("?")[0], method=str(req["method"]))  # raises on unknown routes
        seen.add((endpoint, req["method"]))
    served = {(r.endpoint, m) for r in adapter.map.iter_rules() if r.endpoint != "static"
              for m in (r.methods or set()) - {"HEAD", "OPTIONS"}}
    assert served - seen == set(), "routes the collection does not show"


# ------------------------------------------------------------------------------------------------ scripts
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "REDIS_", "APP_"))}
    env.update({"JWT_SECRET": SECRET, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}, **extra)
    return env


async def test_curl_walkthrough_runs_against_a_live_service(tmp_path: Path) -> None:
    settings = make_settings()
    async with live_server(settings) as srv:
        proc = await asyncio.create_subprocess_exec(
            "bash", str(EXAMPLES / "curl.sh"), cwd=tmp_path, env=_env(BASE_URL=srv.url),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 40)
    text = out.decode()
    assert proc.returncode == 0, text
    assert '{"status":"ok"}' in text and '"ticket"' in text and '{"closed":1}' in text
    received = text.split("== what the stream received", 1)[1]
    assert 'event: notification\ndata: {"title":"Hello","body":"from curl"}' in received
    assert 'event: announcement\ndata: {"text":"to every connected user of the app"}' in received


async def test_python_publisher_example_reaches_a_stream(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url=redis_url)
    async with live_server(settings) as srv:
        st = await open_stream(srv.port, headers=auth(token(settings, "alice", "my-app")))
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(EXAMPLES / "publisher.py"), "my-app", "alice", cwd=tmp_path,
                env=_env(REDIS_URL=redis_url), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, out.decode()
            first, second = await st.next_event(), await st.next_event()
        finally:
            await st.close()
    assert first is not None and (first.event, first.json()) == ("notification", {"title": "Hello",
                                                                                   "body": "from Python"})
    assert second is not None and (second.event, second.id, second.json()) == ("announcement", "announce-1",
                                                                                {"text": "to everyone"})
    assert f"published {first.id} to my-app/alice" in out.decode()
