"""Debian's headless Chromium, driven over the DevTools protocol: open, read, click, screenshot.

``chromium --dump-dom`` shows a page but cannot press its buttons; the Flower
tests click (a state filter, Terminate) as a user does, with real mouse events.
The protocol goes over a websocket with tornado's client (Flower's own
dependency), on one event loop per browser; no other browser library is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import urllib.request
import uuid
from base64 import b64decode
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from tornado.websocket import WebSocketClientConnection, websocket_connect

from tests.support import wait_until

T = TypeVar("T")

#: Seconds one DevTools call may take.
CALL_TIMEOUT = 60.0
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
    "--remote-debugging-port=0",
)


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "Debian's chromium is not installed (scripts/test.sh installs it)"
    return binary


class Chromium:
    """One headless Chromium with one page; :meth:`close` ends it and removes its profile."""

    def __init__(self, workdir: Path) -> None:
        self.profile = workdir / f"chromium-profile-{uuid.uuid4().hex[:6]}"
        command = [chromium_binary(), *FLAGS, f"--user-data-dir={self.profile}", "about:blank"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self._loop = asyncio.new_event_loop()
        self._ids = itertools.count(1)
        url = self._page_socket()

        async def connect() -> WebSocketClientConnection:
            return await websocket_connect(url)  # on the running loop: tornado takes that one

        self._socket = self._run(connect())

    def _page_socket(self) -> str:
        """The DevTools websocket of the browser's page (its port is in the profile once it listens)."""
        active = self.profile / "DevToolsActivePort"
        port = wait_until(lambda: active.exists() and active.read_text().split("\n", 1)[0], 60, "DevTools up")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as response:
            targets = json.load(response)
        return str(next(target for target in targets if target["type"] == "page")["webSocketDebuggerUrl"])

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(asyncio.wait_for(call, CALL_TIMEOUT))

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events that come meanwhile are skipped)."""
        call_id = next(self._ids)

        async def call() -> dict[str, Any]:
            await self._socket.write_message(json.dumps({"id": call_id, "method": method, "params": params}))
            while True:
                raw = await self._socket.read_message()
                assert raw is not None, f"Chromium closed the DevTools connection during {method}"
                reply = json.loads(raw)
                if reply.get("id") == call_id:
                    assert "error" not in reply, f"{method}: {reply['error']}"
                    return dict(reply.get("result", {}))

        return self._run(call())

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 30.0) -> Any:
        """Evaluate ``expression`` until it is truthy; its value."""
        return wait_until(lambda: self.evaluate(expression), timeout, what, every=0.2)

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for(
            f"location.href === {json.dumps(url)} && document.readyState === 'complete'", f"{url} loaded"
        )

    def click(self, selector: str) -> None:
        """Press and release the mouse on the middle of the first element ``selector`` matches."""
        where = self.wait_for(
            "(() => { const e = document.querySelector(" + json.dumps(selector) + ");"
            " if (!e) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()",
            f"{selector} on the page",
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent", type=kind, x=where[0], y=where[1], button="left", clickCount=1
            )

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._socket.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self._loop.close()
        shutil.rmtree(self.profile, ignore_errors=True)
