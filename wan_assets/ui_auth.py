"""Token auth in front of the Dagster UI (docs/architecture.md §8, like the seed's AI_TOOLKIT_AUTH).

Pure ASGI rather than a Starlette `BaseHTTPMiddleware`, because the UI's GraphQL subscriptions
arrive as websockets and those must be refused too. A request passes with `Authorization: Bearer
<token>` or with the cookie that `POST /login` sets; anything else gets 401 and nothing of the UI.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from urllib.parse import parse_qs

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE_NAME = "wan_assets_auth"
LOGIN_PATH = "/login"
# A login form carries one short field; a larger body is not a login and is not read further.
MAX_LOGIN_BODY_BYTES = 4096
WS_CLOSE_UNAUTHORIZED = 4401
# What uvicorn's websockets protocol logs at ERROR after any handshake refused with an HTTP response
# (it counts only an accepted handshake as complete), so also after each 401 of ours.
UVICORN_REFUSED_HANDSHAKE = "ASGI callable returned without completing handshake."
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="wan-assets"', "Cache-Control": "no-store"}

LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wan-assets: log in</title>
<style>body{{font-family:sans-serif;max-width:24rem;margin:5rem auto}}input{{width:100%;margin:.4rem 0}}</style>
</head><body>
<h1>wan-assets</h1>
<p>This Dagster UI needs the token in <code>WAN_ASSETS_AUTH</code>.</p>
{error}
<form method="post" action="{action}">
<input type="password" name="token" placeholder="token" autocomplete="current-password" autofocus required>
<input type="submit" value="Log in">
</form>
</body></html>
"""


def login_page(status_code: int = 200, error: str = "") -> HTMLResponse:
    html = LOGIN_PAGE.format(error=f"<p><strong>{error}</strong></p>" if error else "", action=LOGIN_PATH)
    return HTMLResponse(html, status_code=status_code, headers=CHALLENGE if status_code == 401 else None)


class TokenAuth:
    """ASGI middleware: every HTTP request and websocket handshake must carry `token`."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        assert token, "TokenAuth needs a non-empty token; serve without it for no auth"
        self.app = app
        # Per-process key: the cookie holds HMAC(key, token), never the token, and a restart logs
        # everyone out. Comparing HMACs also keeps the comparison constant-time whatever the length.
        self._key = secrets.token_bytes(32)
        self._expected = self._digest(token)
        self.cookie_value = self._expected.hex()
        self.refused_websockets = 0  # refused handshakes whose uvicorn ERROR line is still to come

    def _digest(self, value: str) -> bytes:
        return hmac.new(self._key, value.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()

    def token_ok(self, value: str) -> bool:
        return hmac.compare_digest(self._digest(value), self._expected)

    def authorized(self, headers: Headers) -> bool:
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.token_ok(credential.strip()):
            return True
        cookie = cookie_parser(headers.get("cookie", "")).get(COOKIE_NAME, "")
        return hmac.compare_digest(cookie.encode("utf-8", "surrogateescape"), self.cookie_value.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
        elif scope["type"] == "http" and scope["path"] == LOGIN_PATH:
            await self._login(scope, receive, send)
        elif self.authorized(Headers(scope=scope)):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._deny_websocket(scope, receive, send)
        else:
            await self._deny_http(scope, receive, send)

    async def _deny_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A browser gets the login form (still 401, so nothing reads it as the UI); scripts get text.
        if "text/html" in Headers(scope=scope).get("accept", ""):
            response: Response = login_page(status_code=401)
        else:
            response = PlainTextResponse(
                "401 unauthorized: send 'Authorization: Bearer <WAN_ASSETS_AUTH>' or log in at /login\n",
                status_code=401,
                headers=CHALLENGE,
            )
        await response(scope, receive, send)

    async def _deny_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect: the handshake is answered, never accepted
        if "websocket.http.response" in scope.get("extensions", {}):
            # Servers that support it (uvicorn does) let the handshake fail with a real 401.
            await send({"type": "websocket.http.response.start", "status": 401, "headers": []})
            await send({"type": "websocket.http.response.body", "body": b"401 unauthorized\n"})
            self.refused_websockets += 1
        else:
            await send({"type": "websocket.close", "code": WS_CLOSE_UNAUTHORIZED})

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method in ("GET", "HEAD"):
            response: Response = login_page()
        elif method != "POST":
            response = PlainTextResponse(
                "405 method not allowed\n", status_code=405, headers={"Allow": "GET, POST"}
            )
        elif self.token_ok(await _form_field(receive, "token")):
            # Always back to "/": a redirect target taken from the request would be an open redirect.
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(
                COOKIE_NAME,
                self.cookie_value,
                httponly=True,
                samesite="strict",
                secure=scope.get("scheme") == "https",
                path="/",
            )
        else:
            response = login_page(status_code=401, error="Wrong token.")
        await response(scope, receive, send)


async def _form_field(receive: Receive, name: str) -> str:
    """One field of an urlencoded form body; empty when the body is missing, too large or not a form."""
    body = b""
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return ""
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > MAX_LOGIN_BODY_BYTES:
            return ""
    values = parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
    return values.get(name, [""])[0]


class RefusedWebsocketFilter(logging.Filter):
    """Drops uvicorn's ERROR line for a websocket that `auth` refused with a 401 (one line per
    refusal, so the same message for any other handshake still reaches the log)."""

    def __init__(self, auth: TokenAuth) -> None:
        super().__init__()
        self.auth = auth

    def filter(self, record: logging.LogRecord) -> bool:
        if self.auth.refused_websockets and record.getMessage() == UVICORN_REFUSED_HANDSHAKE:
            self.auth.refused_websockets -= 1
            return False
        return True
