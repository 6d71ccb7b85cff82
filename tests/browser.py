"""Open an HTML file in headless Chromium with networking off; return its DOM, console errors and a screenshot."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--proxy-server=127.0.0.1:9",  # networking off: every request goes to a closed port
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=8000",
]
_ERROR = re.compile(r"CONSOLE.*(Uncaught|Error|Failed|Refused)", re.IGNORECASE)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@dataclass
class Rendered:
    dom: str
    console_errors: list[str]
    screenshot: Path


def render(path: Path, screenshot: Path) -> Rendered:
    exe = chromium()
    if exe is None:
        raise RuntimeError("no chromium on PATH")
    url = path.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=120,
        )
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={screenshot}", "--window-size=1280,1600", url],
            capture_output=True,
            text=True,
            timeout=120,
        )
    errors = [line for line in dom.stderr.splitlines() if _ERROR.search(line)]
    return Rendered(dom.stdout, errors, screenshot)
