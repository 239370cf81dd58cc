"""A page opened in a real headless Chromium (Debian's), driven over the DevTools protocol: its console errors,
uncaught exceptions and images, as the browser saw them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import websocket

FLAGS = (  # no network: the background services would only fail to reach their hosts (machine notes)
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
    "--disable-background-networking", "--disable-component-update", "--remote-allow-origins=*",
)  # fmt: skip


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        message = "no chromium on this machine (`make browser` installs Debian's)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def open_page(page: Path, timeout: float = 60.0) -> dict:
    """Load `page` and report {"errors": [...], "images": n, "images_loaded": n, "title": ...}."""
    # Chromium's helpers (zygote, renderer, crashpad) run in its session and may still write to the profile
    # while it is removed: the whole group is stopped first, and a file a late helper left is not a failure.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return _drive(Path(profile), page.resolve().as_uri(), time.monotonic() + timeout)
        finally:
            _stop_group(process)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the browser's whole session (its own process group), then SIGKILL what is left after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def _drive(profile: Path, url: str, deadline: float) -> dict:
    port_file = profile / "DevToolsActivePort"
    while not port_file.exists() or not port_file.read_text().strip():
        assert time.monotonic() < deadline, "chromium did not open its DevTools port"
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
        target = next(t for t in json.load(response) if t["type"] == "page")
    socket = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=10)
    counter, errors = iter(range(1, 10_000)), []

    def send(method: str, **params) -> int:
        ident = next(counter)
        socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        return ident

    def until(match) -> dict:
        while time.monotonic() < deadline:
            message = json.loads(socket.recv())
            method, params = message.get("method"), message.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(params["exceptionDetails"].get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(params["entry"]["text"])
            if match(message):
                return message
        raise AssertionError(f"chromium: timed out loading {url}")

    try:
        for domain in ("Runtime", "Log", "Page"):
            ident = send(f"{domain}.enable")
            until(lambda m, i=ident: m.get("id") == i)
        send("Page.navigate", url=url)
        until(lambda m: m.get("method") == "Page.loadEventFired")
        ident = send(
            "Runtime.evaluate",
            expression="JSON.stringify({title: document.title, images: document.images.length, "
            "images_loaded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length})",
            returnByValue=True,
        )
        result = until(lambda m: m.get("id") == ident)["result"]["result"]["value"]
        return {**json.loads(result), "errors": errors}
    finally:
        socket.close()
