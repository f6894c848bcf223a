"""Headless Chromium driven over the DevTools protocol (Debian's `chromium`, the `websockets` client
of the lock; no Python browser package), for tests that must log in as a person does: HTTP basic
auth answered when the browser asks (MLflow's auth app), a login form filled and submitted (the
Prefect UI). Credentials travel over the DevTools socket, never on a command line.

    with Browser(profile) as browser:
        browser.basic_auth("127.0.0.1:5000", "frugalflow", password)
        text = browser.open(url, until=lambda t: "Run Name" in t)
        browser.screenshot(path)
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
START_S = 30


class Browser:
    def __init__(self, profile: Path, width: int = 1600, height: int = 1000):
        self.profile, self.size = Path(profile), (width, height)
        self.logins: dict[str, tuple[str, str]] = {}
        self.auth_asked: list[str] = []  # hosts whose server asked for a login

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Browser":
        from websockets.sync.client import connect

        self.profile.mkdir(parents=True, exist_ok=True)
        port_file = self.profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_S
        while not (port_file.is_file() and len(port_file.read_text().split()) == 2):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"chromium did not open its DevTools port within {START_S} s")
            time.sleep(0.1)
        port, path = port_file.read_text().split()
        self.ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=10)
        self.next_id = 0
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Fetch.enable", {"handleAuthRequests": True, "patterns": [{"urlPattern": "*"}]}, self.session)
        self.call("Page.enable", {}, self.session)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.kill()
        self.proc.wait(timeout=30)

    # ------------------------------------------------------------------ protocol
    def call(self, method: str, params: dict, session: str | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        mine = self.next_id  # answering events below sends messages of their own
        message = {"id": mine, "method": method, "params": params, **({"sessionId": session} if session else {})}
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == mine:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method}: {reply['error']}")
                return reply.get("result", {})
            self._event(reply)

    def _event(self, event: dict) -> None:
        """Let paused requests go on; answer a server's login question with the host's login."""
        method, params = event.get("method"), event.get("params", {})
        if method == "Fetch.requestPaused":
            self._send("Fetch.continueRequest", {"requestId": params["requestId"]})
        elif method == "Fetch.authRequired":
            host = params["request"]["url"].split("/")[2]
            self.auth_asked.append(host)
            login = self.logins.get(host)
            answer = ({"response": "ProvideCredentials", "username": login[0], "password": login[1]} if login
                      else {"response": "CancelAuth"})
            self._send("Fetch.continueWithAuth", {"requestId": params["requestId"], "authChallengeResponse": answer})

    def _send(self, method: str, params: dict) -> None:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params, "sessionId": self.session}))

    # ------------------------------------------------------------------ what a test uses
    def basic_auth(self, host: str, user: str, password: str) -> None:
        """Answer `host`'s (host:port) HTTP login question with this account."""
        self.logins[host] = (user, password)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, self.session)
        return result.get("result", {}).get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait(self, until, timeout: float = 60) -> str:
        """The page's visible text once `until(text)` holds, or the last text after `timeout`."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if until(text):
                break
            time.sleep(0.5)
        return text

    def open(self, url: str, until=lambda text: bool(text.strip()), timeout: float = 60) -> str:
        self.call("Page.navigate", {"url": url}, self.session)
        return self.wait(until, timeout)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"}, self.session)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)
