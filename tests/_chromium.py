"""Drive Debian's headless Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``).

Chromium reads protocol messages from file descriptor 3 and writes its own to descriptor 4, each a
JSON object ended by a NUL byte. That needs no port, no websocket library and no driver download:
one browser process, one page, and the few commands the dashboard tests use (navigate, evaluate,
screenshot). Events are kept only as far as ``wait_for_event`` needs them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# argv: read fd, write fd, program, args...; both are first copied above 10, so that 3 and 4 may be
# among the originals and dup2 always makes a real (inheritable) copy.
_TRAMPOLINE = (
    "import fcntl, os, sys\n"
    "r, w = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3])\n"
    "os.dup2(r, 3)\n"
    "os.dup2(w, 4)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def chromium_path() -> str | None:
    """The browser binary: ``$NEUROTWIN_CHROMIUM``, else Debian's or another common location."""
    configured = os.environ.get("NEUROTWIN_CHROMIUM")
    if configured:
        return configured
    return next((p for p in CHROMIUM_CANDIDATES if os.access(p, os.X_OK)), None)


class BrowserError(RuntimeError):
    pass


class HeadlessChromium:
    """One headless browser with one page, attached in flat session mode."""

    def __init__(self, binary: str, width: int = 1280, height: int = 1000, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="neurotwin-chromium-")
        # Our ends: we write commands to `to_browser`, read replies from `from_browser`.
        browser_reads, to_browser = os.pipe()
        from_browser, browser_writes = os.pipe()
        # Chromium must find them as descriptors 3 and 4. Popen cannot renumber descriptors, and a
        # preexec_fn is unsafe in a threaded process, so a tiny Python trampoline does it and then
        # becomes the browser (sh cannot: dash takes single-digit descriptors only).
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _TRAMPOLINE,
                str(browser_reads),
                str(browser_writes),
                binary,
                "--headless",
                "--remote-debugging-pipe",
                "--no-sandbox",  # the tests may run as root in a container
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--hide-scrollbars",
                "--mute-audio",
                f"--user-data-dir={self._profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(browser_reads, browser_writes),
        )
        os.close(browser_reads)
        os.close(browser_writes)
        self._out = os.fdopen(to_browser, "wb", buffering=0)
        self._in = os.fdopen(from_browser, "rb", buffering=0)
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="chromium-pipe", daemon=True)
        self._reader.start()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.page("Page.enable")
        self.page("Runtime.enable")
        self.page(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    # -- protocol ----------------------------------------------------------------------------------
    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = self._in.read(65536)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                with self._cond:
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self._events.append(message)
                    self._cond.notify_all()

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        with self._cond:
            self._next_id += 1
            message_id = self._next_id
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while message_id not in self._replies:
                if self._closed:
                    raise BrowserError(f"chromium exited during {method}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrowserError(f"no reply to {method} within {self.timeout} s")
                self._cond.wait(left)
            reply = self._replies.pop(message_id)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def page(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self.send(method, params, session=self.session)

    def wait_for_event(self, method: str, timeout: float | None = None) -> dict[str, Any]:
        """The first event named ``method`` (from any session) not yet consumed."""
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cond:
            while True:
                for i, event in enumerate(self._events):
                    if event.get("method") == method:
                        return self._events.pop(i)
                if self._closed:
                    raise BrowserError(f"chromium exited waiting for {method}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrowserError(f"no {method} within the timeout")
                self._cond.wait(left)

    # -- what the tests use ------------------------------------------------------------------------
    def navigate(self, url: str) -> None:
        with self._cond:
            self._events = [e for e in self._events if e.get("method") != "Page.loadEventFired"]
        result = self.page("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"navigate {url}: {result['errorText']}")
        self.wait_for_event("Page.loadEventFired")

    def add_init_script(self, source: str) -> None:
        """Run ``source`` in every document this page loads, before the page's own scripts."""
        self.page("Page.addScriptToEvaluateOnNewDocument", {"source": source})

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression (awaited when it is a promise)."""
        result = self.page(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"script failed: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 45.0, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {what or expression}")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> Path:
        data = self.page("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except BrowserError:
            pass
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)
        self._out.close()
        self._in.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
