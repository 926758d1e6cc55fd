"""How a browser gets past the bearer token: a login form that exchanges the token for a cookie.

A browser cannot add ``Authorization: Bearer`` to a page load or an ``<img>`` request, so the dashboard
accepts, besides that header, a cookie the login form issues after checking the token. The cookie:

- is ``HttpOnly`` (page scripts never see it), ``SameSite=Strict`` (no other site's page can make the
  browser send it), ``Path=/ui`` (only the dashboard's paths get it) and ``Secure`` when the server
  speaks TLS; it expires after ``lifetime_s`` (8 hours by default), checked by the server;
- holds no token: ``expiry.nonce.mac`` where mac is an HMAC-SHA256 keyed by a key derived from the
  token used, so removing that token from the server's list invalidates the cookies issued for it,
  and replicas sharing the tokens accept each other's cookies without shared state;
- only authorizes GET and HEAD under ``/ui``: the dashboard is read-only, and the rest of the API
  (``/v2``, gRPC) still wants the bearer header.

The login POST is refused when the browser says it comes from another origin (``Sec-Fetch-Site``,
else ``Origin``), and a wrong token costs the caller a second. Logging out clears the cookie in that
browser; a copied cookie stays valid until it expires (the price of keeping no server-side state).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
import urllib.parse
from collections.abc import Collection

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from neurotwin.server.http import error_response, read_body

PREFIX = "/ui"
LOGIN_PATH = "/ui/login"
LOGOUT_PATH = "/ui/logout"
COOKIE = "neurotwin_ui"
DEFAULT_LIFETIME_S = 8 * 3600
# Separates these keys from any other use of the tokens; bump the version to void every cookie.
_KEY_LABEL = b"neurotwin dashboard cookie v1"
_LOGIN_BODY_LIMIT = 8192
_WRONG_TOKEN_DELAY_S = 1.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def cookie_value(headers: dict[str, str], name: str = COOKIE) -> str:
    """The named cookie from a Cookie header ("" when absent)."""
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value.strip().strip('"')
    return ""


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site's page."""
    # Fetch metadata first: browsers set it on every request and pages cannot forge it.
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is not None:
        # Compare host and port only: a TLS-terminating proxy in front changes the scheme.
        return urllib.parse.urlsplit(origin).netloc == request.headers.get("host", "")
    return True  # not a browser: nothing to protect against


class CookieAuth:
    """The dashboard's ``BrowserAuth`` (see ``server.http``), and its login and logout endpoints."""

    prefix = PREFIX

    def __init__(
        self, tokens: Collection[str], secure: bool, login_page: str, lifetime_s: int = DEFAULT_LIFETIME_S
    ) -> None:
        self._tokens = sorted(tokens)
        self._keys = [hmac.new(t.encode(), _KEY_LABEL, hashlib.sha256).digest() for t in self._tokens]
        self.secure = secure
        self.lifetime_s = lifetime_s
        # The form's HTML, with "{message}" where an error goes (already escaped text).
        self._login_page = login_page

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    # -- cookies -----------------------------------------------------------------------------------
    def _mac(self, key: bytes, payload: str) -> str:
        return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())

    def issue(self, token: str, now: float | None = None) -> str:
        index = self._token_index(token)
        if index is None:
            raise ValueError("not a token of this server")
        expires = int((time.time() if now is None else now) + self.lifetime_s)
        payload = f"{expires}.{secrets.token_urlsafe(12)}"
        return f"{payload}.{self._mac(self._keys[index], payload)}"

    def cookie_valid(self, value: str, now: float | None = None) -> bool:
        payload, _, mac = value.rpartition(".")
        expires, _, _nonce = payload.partition(".")
        if not expires.isdigit() or not mac:
            return False
        if int(expires) <= (time.time() if now is None else now):
            return False
        # Every key is tried, so the time taken does not say which token a forged cookie matched.
        matches = [hmac.compare_digest(mac, self._mac(key, payload)) for key in self._keys]
        return any(matches)

    def _token_index(self, token: str) -> int | None:
        found = None
        for i, known in enumerate(self._tokens):
            if hmac.compare_digest(token.encode(), known.encode()):
                found = i
        return found

    # -- BrowserAuth -------------------------------------------------------------------------------
    def admits(self, method: str, path: str, headers: dict[str, str]) -> bool:
        if path in (LOGIN_PATH, LOGOUT_PATH):
            return True  # their handlers check what they need
        if method not in ("GET", "HEAD"):
            return False
        value = cookie_value(headers)
        return bool(value) and self.cookie_valid(value)

    def refused(self, method: str, path: str) -> Response:
        if method in ("GET", "HEAD") and path in (PREFIX, PREFIX + "/"):
            # A page load: send the browser to the form (relative, so a path prefix in front works).
            return RedirectResponse("login" if path.endswith("/") else "ui/login", status_code=303)
        challenge = {"WWW-Authenticate": 'Bearer realm="neurotwin"'}
        return error_response(401, "missing or invalid bearer token or dashboard login", challenge)

    # -- endpoints ---------------------------------------------------------------------------------
    def _form(self, message: str = "", status: int = 200) -> HTMLResponse:
        text = f'<p class="error" role="alert">{message}</p>' if message else ""
        return HTMLResponse(self._login_page.replace("{message}", text), status_code=status)

    async def login_page(self, request: Request) -> Response:
        if not self.enabled:
            return RedirectResponse("./", status_code=303)
        return self._form()

    async def login(self, request: Request) -> Response:
        if not same_origin(request):
            return error_response(403, "login from another site's page refused")
        if not self.enabled:
            return RedirectResponse("./", status_code=303)
        body = await read_body(request, _LOGIN_BODY_LIMIT)
        fields = urllib.parse.parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
        token = (fields.get("token") or [""])[0].strip()
        if not token or self._token_index(token) is None:
            await asyncio.sleep(_WRONG_TOKEN_DELAY_S)
            return self._form("That token is not valid on this server.", status=401)
        response = RedirectResponse("./", status_code=303)
        response.set_cookie(
            COOKIE,
            self.issue(token),
            max_age=self.lifetime_s,
            path=PREFIX,
            secure=self.secure,
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(self, request: Request) -> Response:
        if not same_origin(request):
            return error_response(403, "logout from another site's page refused")
        response = RedirectResponse("login", status_code=303)
        response.delete_cookie(COOKIE, path=PREFIX, secure=self.secure, httponly=True, samesite="strict")
        return response
