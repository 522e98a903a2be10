"""Headless Chromium (Debian's package) and a local `mlflow server`, for the browser tests.

Chromium runs with networking features off and a net log: the tests read back every URL the page
requested, which images loaded, and keep a screenshot in .test-artifacts/ (CI keeps that folder).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / ".test-artifacts"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--window-size=1280,2000",
         "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter",   # Chromium's own calls
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"]
PROBE = ("<script>window.addEventListener('load', () => { const im = [...document.images];"
         "document.documentElement.setAttribute('data-images', im.length + '/' +"
         " im.filter(i => i.complete && i.naturalWidth > 0).length);"
         "document.documentElement.setAttribute('data-width', document.documentElement.scrollWidth + '/' +"
         " window.innerWidth); });</script>")          # page width vs the 1280-pixel window: overflow


def chromium_or_skip() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Chromium is not installed (as root: scripts/system-deps.sh chromium)")
    return exe


BROWSER_SERVICES = (".google.com", ".googleapis.com", ".gstatic.com", ".gvt1.com")   # Chromium's own calls


def _netlog(netlog: Path) -> tuple[set[str], set[str]]:
    """(URLs requested, remote addresses a socket tried to connect to)."""
    text = netlog.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:                         # Chromium may leave the closing bracket out
        text = text.rstrip().rstrip(",")
        data = json.loads(text + ("]}" if not text.endswith("}") else ""))
    names = {v: k for k, v in data.get("constants", {}).get("logEventTypes", {}).items()}
    urls, addresses = set(), set()
    socket_peer: dict = {}                               # source id -> address it connected to
    for ev in data.get("events", []):
        params = ev.get("params") or {}
        name = names.get(ev.get("type"), "")
        if params.get("url"):
            urls.add(params["url"])
        if isinstance(params.get("address"), str) and name in ("TCP_CONNECT_ATTEMPT", "TCP_CONNECT",
                                                              "SOCKET_CONNECT", "UDP_CONNECT"):
            socket_peer[ev["source"]["id"]] = params["address"]
            if name.startswith("TCP"):
                addresses.add(params["address"])        # a TCP handshake leaves the machine
        if name in ("UDP_BYTES_SENT", "SOCKET_BYTES_SENT") and ev["source"]["id"] in socket_peer:
            addresses.add(socket_peer[ev["source"]["id"]])   # a datagram was sent
    return urls, addresses


def _is_local(host_port: str) -> bool:
    host = host_port.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("::1", "localhost")


def render(chromium: str, url: str, out_dir: Path, name: str, dom: bool = False, budget_ms: int = 15000,
           width: int = 1280) -> dict:
    """Load a page in a window `width` pixels wide; screenshot it into .test-artifacts/<name>.png; report
    images, requests and the page's width against the window's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    target = url
    if url.startswith("file://"):                       # a probe copy beside the page: counts loaded images
        page = Path(urlparse(url).path)
        probe = page.with_name(f".probe-{page.name}")
        probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
        target = probe.as_uri()
    netlog = out_dir / f"{name}-netlog.json"
    shot = ARTIFACTS / f"{name}.png"
    with tempfile.TemporaryDirectory() as profile:
        flags = [f for f in FLAGS if not f.startswith("--window-size=")] + [f"--window-size={width},2000"]
        common = [chromium, *flags, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
        subprocess.run([*common, f"--log-net-log={netlog}", f"--screenshot={shot}", target],
                       capture_output=True, text=True, timeout=180)
        d = subprocess.run([*common, "--dump-dom", target], capture_output=True, text=True, timeout=180)
    urls, addresses = _netlog(netlog) if netlog.is_file() else (set(), set())
    remote = sorted(u for u in urls if urlparse(u).scheme in ("http", "https", "ws", "wss")
                    and urlparse(u).hostname not in ("127.0.0.1", "localhost", "::1"))
    external = [u for u in remote if not (urlparse(u).hostname or "").endswith(BROWSER_SERVICES)]
    total = loaded = page_width = view_width = None
    marker = 'data-images="'
    if marker in d.stdout:
        total, loaded = map(int, d.stdout.split(marker, 1)[1].split('"', 1)[0].split("/"))
    if 'data-width="' in d.stdout:
        page_width, view_width = map(int, d.stdout.split('data-width="', 1)[1].split('"', 1)[0].split("/"))
    assert shot.is_file() and shot.stat().st_size > 1000, f"no screenshot from Chromium for {url}"
    return {"screenshot": shot, "dom": d.stdout, "urls": urls, "external_requests": external,
            "browser_service_requests": [u for u in remote if u not in external],
            "non_local_connections": sorted(a for a in addresses if not _is_local(a)),
            "images_total": total, "images_loaded": loaded, "page_width": page_width, "view_width": view_width}


@contextlib.contextmanager
def served_mlflow(backend_uri: str, port: int | None = None):
    """`mlflow server` on 127.0.0.1 (the pipeline's own TrackingServer), yields its base URL."""
    from pipeline.tracking_server import TrackingServer
    art = tempfile.mkdtemp(prefix="mlart")
    try:
        with TrackingServer(backend_uri, art, port=port) as url:
            yield url
    finally:
        shutil.rmtree(art, ignore_errors=True)
