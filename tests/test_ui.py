"""`wan-assets ui`: the token middleware on its own, then the real server over real HTTP and websockets."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import psutil
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from wan_assets.ui import (
    DAGSTER_YAML,
    is_loopback,
    pool_limits,
    stop_process_group,
    write_instance_config,
)
from wan_assets.ui_auth import COOKIE_NAME, WS_CLOSE_UNAUTHORIZED, TokenAuth

TOKEN = "correct-horse-battery-staple"
WRONG_SAME_LENGTH = "x" * len(TOKEN)
BEARER = {"Authorization": f"Bearer {TOKEN}"}
SERVER_START_TIMEOUT_S = 120.0
SERVER_STOP_TIMEOUT_S = 60.0


# -- the middleware alone -------------------------------------------------------------------------


async def _echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())
    await websocket.close()


@pytest.fixture
def client() -> TestClient:
    inner = Starlette(
        routes=[
            Route("/", lambda request: PlainTextResponse("the ui")),
            WebSocketRoute("/graphql", _echo),
        ]
    )
    return TestClient(TokenAuth(inner, TOKEN), follow_redirects=False)


def test_no_credentials_get_401_and_nothing_of_the_app(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 401
    assert "the ui" not in response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    browser = client.get("/", headers={"Accept": "text/html"})
    assert browser.status_code == 401
    assert 'action="/login"' in browser.text


def test_bearer_token(client: TestClient) -> None:
    assert client.get("/", headers=BEARER).text == "the ui"
    assert client.get("/", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    for bad in (WRONG_SAME_LENGTH, TOKEN[:-1], TOKEN + "x", ""):
        assert client.get("/", headers={"Authorization": f"Bearer {bad}"}).status_code == 401
    assert client.get("/", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401


def test_login_sets_a_derived_httponly_cookie(client: TestClient) -> None:
    assert client.get("/login").status_code == 200
    refused = client.post("/login", data={"token": WRONG_SAME_LENGTH})
    assert refused.status_code == 401
    assert COOKIE_NAME not in refused.cookies

    response = client.post("/login", data={"token": TOKEN})
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    set_cookie = response.headers["set-cookie"].lower()
    assert "httponly" in set_cookie
    assert "samesite=strict" in set_cookie
    assert TOKEN not in response.headers["set-cookie"]
    assert client.get("/").text == "the ui"  # the client sends the cookie now


def test_forged_or_foreign_cookie_refused(client: TestClient) -> None:
    other = TokenAuth(Starlette(), TOKEN)  # same token, other process key: other cookie
    for value in (TOKEN, other.cookie_value, "0" * 64):
        assert client.get("/", cookies={COOKIE_NAME: value}).status_code == 401


def test_oversized_login_body_refused(client: TestClient) -> None:
    body = urlencode({"token": TOKEN, "pad": "x" * 10_000})
    response = client.post(
        "/login", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 401


def test_websocket_needs_credentials(client: TestClient) -> None:
    with pytest.raises(WebSocketDenialResponse) as denied:
        client.websocket_connect("/graphql").__enter__()
    assert denied.value.status_code == 401
    # A copy: the test client adds its handshake headers to the dict it is given.
    with client.websocket_connect("/graphql", headers=dict(BEARER)) as websocket:
        websocket.send_text("ping")
        assert websocket.receive_text() == "ping"


def test_websocket_closed_with_4401_without_denial_extension() -> None:
    # Servers without the websocket.http.response extension get a close before accept.
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "websocket.connect"}

    async def send(message: dict) -> None:
        sent.append(message)

    async def app(scope: dict, receive: object, send: object) -> None:
        raise AssertionError("the app must not see an unauthenticated websocket")

    scope = {"type": "websocket", "path": "/graphql", "headers": [], "extensions": {}}
    asyncio.run(TokenAuth(app, TOKEN)(scope, receive, send))
    assert sent == [{"type": "websocket.close", "code": WS_CLOSE_UNAUTHORIZED}]


# -- helpers of ui.py -------------------------------------------------------------------------------


def test_instance_config_is_valid_and_user_edits_survive(tmp_path: Path) -> None:
    from dagster import DagsterInstance

    path = write_instance_config(tmp_path)
    assert path.read_text() == DAGSTER_YAML
    with DagsterInstance.from_config(str(tmp_path)) as instance:  # validates against 1.13's schema
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 30
        assert instance.global_op_concurrency_default_limit == 1
    path.write_text("telemetry:\n  enabled: false\n")
    write_instance_config(tmp_path)
    assert path.read_text() == "telemetry:\n  enabled: false\n"


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")


def test_stop_process_group_kills_what_ignores_sigterm() -> None:
    # A leader that ignores SIGTERM, with a child of its own: the stop must leave nothing behind.
    script = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('up', flush=True); "
        "time.sleep(60)"
    )
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.PIPE)
    assert leader.stdout is not None and leader.stdout.readline() == b"up\n"
    family = [psutil.Process(leader.pid), *psutil.Process(leader.pid).children(recursive=True)]
    assert len(family) == 2
    stop_process_group(leader, timeout_s=1.0)
    _, alive = psutil.wait_procs(family, timeout=5)
    assert not alive


def test_daemon_child_dies_with_a_killed_parent(tmp_path: Path) -> None:
    # The parent starts a child the way `start_daemon` does, then is SIGKILLed: no chance to clean up.
    script = (
        "import subprocess, sys, time; from wan_assets.ui import _die_with_parent; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
        "start_new_session=True, preexec_fn=_die_with_parent()); print(child.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child = psutil.Process(int(parent.stdout.readline()))
    parent.kill()
    parent.wait()
    _, alive = psutil.wait_procs([child], timeout=10)
    assert not alive


# -- the real server ---------------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def graphql(self, query: str, headers: dict[str, str]) -> tuple[int, bytes]:
        body = json.dumps({"query": query}).encode()
        status, _, content = self.request(
            "POST", "/graphql", {**headers, "Content-Type": "application/json"}, body
        )
        return status, content

    def websocket(self, headers: dict[str, str]) -> None:
        url = f"ws://127.0.0.1:{self.port}/graphql"
        with ws_connect(url, additional_headers=headers, subprotocols=["graphql-ws"], open_timeout=20):
            pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_answering(server: Server) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"ui exited with {server.process.returncode}:\n{server.log.read_text()[-4000:]}")
        try:
            server.request("GET", "/server_info")
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"ui did not answer within {SERVER_START_TIMEOUT_S}s:\n{server.log.read_text()[-4000:]}")


def start_server(command: list[str], env: dict[str, str], port: int, log: Path) -> Server:
    """The server in its own session (so the daemon and code servers can be stopped as a group),
    answering HTTP before this returns."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(process, port, log)
    try:
        _wait_until_answering(server)
    except BaseException:
        _stop(process)
        raise
    return server


def _stop(process: subprocess.Popen[bytes]) -> int:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("ui")
    port = _free_port()
    env = {
        **os.environ,
        "WAN_ASSETS_AUTH": TOKEN,
        "WAN_ASSETS_HOME": str(workdir),
        "DAGSTER_HOME": str(workdir / "dagster"),
    }
    code = f"from pathlib import Path; from wan_assets.ui import serve; serve(Path({str(workdir)!r}), port={port})"
    server = start_server([sys.executable, "-c", code], env, port, workdir / "ui.log")
    try:
        yield server
    finally:
        if server.process.poll() is None:
            _stop(server.process)


def test_server_refuses_without_token(server: Server) -> None:
    for path in ("/", "/server_info", "/graphql"):
        status, _, body = server.request("GET", path)
        assert status == 401, path
        assert b"<script" not in body.lower(), path
    status, _, _ = server.request("GET", "/", {"Accept": "text/html"})
    assert status == 401
    assert server.graphql("{ version }", {})[0] == 401
    assert server.graphql("{ version }", {"Authorization": f"Bearer {WRONG_SAME_LENGTH}"})[0] == 401


def test_server_refuses_websocket_without_token(server: Server) -> None:
    for headers in ({}, {"Authorization": f"Bearer {WRONG_SAME_LENGTH}"}, {"Cookie": f"{COOKIE_NAME}=00"}):
        with pytest.raises(InvalidStatus) as refused:
            server.websocket(headers)
        assert refused.value.response.status_code == 401
    # A refusal is the server doing its job, not an error in its log (uvicorn logs one by default).
    time.sleep(0.5)
    uvicorn_errors = [line for line in server.log.read_text().splitlines() if line.startswith("ERROR:")]
    assert uvicorn_errors == []


def test_server_serves_ui_and_graphql_with_bearer(server: Server) -> None:
    from dagster_webserver.version import __version__

    status, _, body = server.request("GET", "/", BEARER)
    assert status == 200
    assert b"<html" in body.lower()
    status, content = server.graphql("{ version }", BEARER)
    assert status == 200
    assert f'"version":"{__version__}"'.encode() in content.replace(b" ", b"")
    server.websocket(BEARER)  # the subscription handshake goes through


def test_server_applies_pool_limits(server: Server) -> None:
    query = "{ instance { concurrencyLimits { concurrencyKey slotCount } } }"
    status, content = server.graphql(query, BEARER)
    assert status == 200
    for pool, limit in pool_limits().items():
        assert f'{{"concurrencyKey":"{pool}","slotCount":{limit}}}'.encode() in content.replace(b" ", b"")


def test_server_login_cookie(server: Server) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, _ = server.request("POST", "/login", form, urlencode({"token": WRONG_SAME_LENGTH}).encode())
    assert status == 401
    status, headers, _ = server.request("POST", "/login", form, urlencode({"token": TOKEN}).encode())
    assert status == 303
    assert headers["Location"] == "/"
    cookie = headers["Set-Cookie"].split(";")[0]
    assert cookie.startswith(f"{COOKIE_NAME}=") and TOKEN not in cookie
    status, _, body = server.request("GET", "/", {"Cookie": cookie})
    assert status == 200 and b"<html" in body.lower()
    assert server.graphql("{ version }", {"Cookie": cookie})[0] == 200
    server.websocket({"Cookie": cookie})


def test_server_sigterm_stops_webserver_and_daemon(server: Server) -> None:
    # Runs last in this module: it stops the shared server.
    children = psutil.Process(server.process.pid).children(recursive=True)
    assert any("dagster._daemon" in " ".join(child.cmdline()) for child in children)
    assert _stop(server.process) == 0
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
