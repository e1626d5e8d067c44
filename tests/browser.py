"""Headless Chromium (Debian's `chromium` package) for the tests that check what a person sees in a browser.

`render(url, screenshot=...)` loads a page, lets its scripts run (virtual time, so a page that fetches data
settles deterministically), and returns the DOM as HTML; with `screenshot` it also saves a PNG. Running as root
needs `--no-sandbox`; every call gets a fresh profile directory and no network services of Chromium's own.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


def chromium() -> str:
    """The Chromium executable; skips the test (with how to install it) when there is none."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium not installed (Debian: apt-get install chromium; .ci/run installs it)")


def render(
    url: str,
    screenshot: Path | None = None,
    budget_ms: int = 15000,
    window: tuple[int, int] = (1600, 1200),
    timeout_s: float = 180,
) -> str:
    """The DOM of `url` after its scripts ran for `budget_ms` of virtual time (and a PNG at `screenshot`)."""
    exe = chromium()
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        base = [exe, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
        base.append(f"--window-size={window[0]},{window[1]}")
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=timeout_s)
        if dom.returncode != 0:
            raise RuntimeError(f"chromium failed on {url} (exit {dom.returncode}): {dom.stderr[-2000:]}")
        if screenshot is not None:
            shot = subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=timeout_s)
            if shot.returncode != 0 or not Path(screenshot).is_file():
                raise RuntimeError(f"chromium screenshot of {url} failed: {shot.stderr[-2000:]!r}")
    return dom.stdout


def visible_text(dom: str) -> str:
    """The text of a DOM dump, without scripts, styles and tags, whitespace collapsed."""
    dom = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", dom)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"(?s)<[^>]+>", " ", dom))).strip()
