"""Headless Chromium (Debian's `chromium`) for tests that check what a page shows.

`check_page` loads a copy of the page with a probe script that writes what the browser laid out
(images decoded, SVG plots with a size, warning colours, the first thumbnail's box) into the
title, which `--dump-dom` prints; `screenshot` renders the page to a PNG at the same size."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

WINDOW = (1280, 3000)
PROBE = """
<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; };
  const thumb = document.querySelector("img.thumb");
  const warning = document.querySelector(".warning");
  document.title = "PROBE" + JSON.stringify({
    images: imgs.length,
    decoded: imgs.filter((i) => i.complete && i.naturalWidth > 0).length,
    broken: imgs.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.alt),
    thumbs: document.querySelectorAll("img.thumb").length,
    scatter: [...document.querySelectorAll("img.scatter")].filter((i) => i.naturalWidth > 0).length,
    svgs: [...document.querySelectorAll("svg")].filter((s) => s.getBoundingClientRect().width > 50).length,
    svg_bars: document.querySelectorAll("figure.histogram svg path, figure.histogram svg rect").length,
    first_thumb: thumb ? box(thumb) : null,
    warning_color: warning ? getComputedStyle(warning).color : null,
    warning_text: warning ? warning.textContent : null,
  });
});
</script>
"""


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "chromium is not installed: these tests render pages in headless Chromium "
            "(Debian: apt-get install -y chromium)"
        )
    return path


def _run(args: list[str], tmp: Path) -> str:
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def check_page(page: Path, tmp: Path) -> dict:
    """What the browser reports about ``page`` after it loaded (see PROBE)."""
    probed = tmp / f"probed-{page.name}"
    text = page.read_text(encoding="utf-8")
    probed.write_text(text.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
    dom = _run(["--virtual-time-budget=5000", "--dump-dom", probed.as_uri()], tmp)
    found = re.search(r"<title>PROBE(.*?)</title>", dom, re.S)
    assert found, f"the probe did not run; title: {re.search(r'<title>(.*?)</title>', dom, re.S)}"
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, tmp: Path) -> Path:
    out = tmp / f"{page.stem}.png"
    _run(["--virtual-time-budget=5000", f"--screenshot={out}", page.as_uri()], tmp)
    assert out.exists(), "chromium wrote no screenshot"
    return out
