"""The OHIF viewer for the end-to-end viewer test: the prebuilt ``@ohif/app`` from the npm
registry (``npm pack``, never a build from source), an ``app-config.js`` the test writes, and
a small static server on 127.0.0.1 that serves OHIF at ``/`` and proxies ``/dicom-web/`` to
Orthanc, so the viewer and the PACS share one origin.  Also the Playwright helpers the test
drives Debian's Chromium with (software WebGL: SwiftShader through ANGLE).

The package is cached under ``$DICOM_NODE_TEST_CACHE`` (default
``$XDG_CACHE_HOME/dicom-node-test``, else ``~/.cache/dicom-node-test``) as
``ohif-<version>/dist``, fetched on first use.
"""

from __future__ import annotations

import fcntl
import http.client
import io
import json
import mimetypes
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
CHROMIUM = Path("/usr/bin/chromium")
# Software WebGL in headless Chromium: ANGLE on SwiftShader (no GPU on the test machines).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DICOMWEB_ROOT = "/dicom-web"
HOP_BY_HOP = ("connection", "keep-alive", "transfer-encoding", "content-length")


class ViewerUnavailable(RuntimeError):
    """The OHIF package could not be fetched (no npm, or the registry unreachable)."""


def cache_root() -> Path:
    if os.environ.get("DICOM_NODE_TEST_CACHE"):
        return Path(os.environ["DICOM_NODE_TEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dicom-node-test"


def ohif_dist(version: str = OHIF_VERSION) -> Path:
    """The ``dist/`` folder of the prebuilt OHIF viewer, fetched with ``npm pack`` once.

    Raises :class:`ViewerUnavailable` when npm is missing or cannot reach the registry, and
    RuntimeError when npm answers but the package is not what was expected."""
    root = cache_root()
    target = root / f"ohif-{version}"
    dist = target / "dist"
    if (dist / "index.html").is_file():
        return dist
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".ohif-{version}.lock").open("w") as lock:  # pytest-xdist workers
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dist / "index.html").is_file():
            return dist
        npm = shutil.which("npm")
        if npm is None:
            raise ViewerUnavailable("npm is not installed (apt-get install npm)")
        with tempfile.TemporaryDirectory(dir=root) as work:
            done = subprocess.run(
                [npm, "pack", f"{OHIF_PACKAGE}@{version}", "--silent"],
                cwd=work,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode != 0:
                text = done.stderr + done.stdout
                if any(
                    word in text
                    for word in ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "network")
                ):
                    raise ViewerUnavailable(f"npm could not reach the registry: {text[-2000:]}")
                raise RuntimeError(f"npm pack {OHIF_PACKAGE}@{version} failed: {text[-4000:]}")
            tarballs = list(Path(work).glob("*.tgz"))
            if len(tarballs) != 1:
                raise RuntimeError(f"npm pack left {tarballs} in {work}")
            unpacked = Path(work) / "unpacked"
            with tarfile.open(tarballs[0]) as archive:
                archive.extractall(unpacked, filter="data")
            manifest = json.loads((unpacked / "package" / "package.json").read_text())
            if manifest.get("version") != version:
                raise RuntimeError(f"npm gave {OHIF_PACKAGE} {manifest.get('version')}")
            if not (unpacked / "package" / "dist" / "index.html").is_file():
                raise RuntimeError(f"{OHIF_PACKAGE}@{version} holds no dist/index.html")
            if target.exists():
                shutil.rmtree(target)
            (unpacked / "package").rename(target)
    return dist


def app_config(dicomweb_root: str = DICOMWEB_ROOT) -> str:
    """OHIF 3 ``window.config``: one DICOMweb data source at ``dicomweb_root`` (same origin).

    Orthanc's DICOMweb plugin serves no static-WADO layout, answers QIDO-RS ``includefield``
    and renders thumbnails, which is what the keys below say."""
    source = {
        "friendlyName": "Orthanc (dicom-node test PACS)",
        "name": "orthanc",
        "wadoUriRoot": dicomweb_root,
        "qidoRoot": dicomweb_root,
        "wadoRoot": dicomweb_root,
        "qidoSupportsIncludeField": True,
        "supportsReject": False,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "supportsFuzzyMatching": False,
        "supportsWildcard": True,
        "staticWado": False,
        "singlepart": "bulkdata,video",
        "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        "omitQuotationForMultipartRequest": True,
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "showErrorDetails": "always",
        "defaultDataSourceName": "orthanc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": source,
            }
        ],
    }
    text = json.dumps(config, indent=2)
    return f"/** written by tests/viewer_support.py */\nwindow.config = {text};\n"


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        self.server.requests.append(f"{self.command} {self.path} " + (format % args))

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        path = urlsplit(self.path).path
        if path == DICOMWEB_ROOT or path.startswith(DICOMWEB_ROOT + "/"):
            self._proxy()
        elif path == "/app-config.js":
            self._send(200, "application/javascript", self.server.config_js.encode())
        else:
            self._static(path)

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _static(self, path: str) -> None:
        dist = self.server.dist
        candidate = (dist / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(dist) or not candidate.is_file():
            if "." in path.rsplit("/", 1)[-1]:  # a missing file, not a route of the SPA
                self._send(404, "text/plain", b"not found")
                return
            candidate = dist / "index.html"  # the SPA's routes (/viewer, ...) are index.html
        kind = mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
        if candidate.suffix == ".wasm":
            kind = "application/wasm"
        elif candidate.suffix in (".js", ".mjs"):
            kind = "application/javascript"
        self._send(200, kind, candidate.read_bytes())

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in ("connection", "keep-alive", "accept-encoding", "content-length")
        }
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port, timeout=120)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in (
                "connection",
                "keep-alive",
                "transfer-encoding",
                "content-length",
            ):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class ViewerServer(ThreadingHTTPServer):
    """OHIF's ``dist`` at ``/`` and Orthanc's DICOMweb at ``/dicom-web/``, one origin."""

    daemon_threads = True

    def __init__(self, dist: Path, orthanc_port: int, config_js: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dist = dist.resolve()
        self.orthanc_port = orthanc_port
        self.config_js = config_js
        self.requests: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> ViewerServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


@contextmanager
def viewer(dist: Path, orthanc_port: int, config_path: Path) -> Iterator[ViewerServer]:
    """Write ``app-config.js`` to ``config_path`` and serve OHIF with it."""
    config_path.write_text(app_config())
    with ViewerServer(dist, orthanc_port, config_path.read_text()) as server:
        yield server


# --- Playwright helpers ----------------------------------------------------------------------

# OHIF's own names: its cornerstone rendering engine and the one viewport of a 1x1 layout.
RENDERING_ENGINE = "OHIFCornerstoneRenderingEngine"
# Marks the onboarding tour as seen, so that its pop-up does not cover the viewport.
SKIP_TOUR = "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))"


def region_pixels(page: Any, clip: dict[str, float]) -> Any:
    """The page's pixels in ``clip`` (CSS pixels, device scale 1) as an int16 RGB array."""
    import numpy as np
    from PIL import Image

    png = page.screenshot(clip=clip, animations="disabled")
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def webgl_renderer(page: Any) -> str:
    """What WebGL the page gets (empty when none): SwiftShader is expected here."""
    return str(
        page.evaluate(
            """() => {
                const gl = document.createElement('canvas').getContext('webgl2');
                if (!gl) return '';
                const info = gl.getExtension('WEBGL_debug_renderer_info');
                return info ? gl.getParameter(info.UNMASKED_RENDERER_WEBGL)
                            : gl.getParameter(gl.RENDERER);
            }"""
        )
    )


def viewport_state(page: Any) -> dict[str, Any] | None:
    """The displayed image of OHIF's viewport and where it lies on the page (None: none yet).

    ``imageId`` is cornerstone's WADO-RS image id (it names the SOP Instance UID); ``rect``
    the viewport's element in page pixels."""
    return page.evaluate(
        """(engineId) => {
            const cs = window.cornerstone;
            const engine = cs && cs.getRenderingEngine(engineId);
            const viewport = engine && engine.getViewports()[0];
            if (!viewport || !viewport.getCurrentImageId) return null;
            const imageId = viewport.getCurrentImageId();
            if (!imageId) return null;
            const r = viewport.element.getBoundingClientRect();
            return {imageId, rect: {x: r.x, y: r.y, width: r.width, height: r.height}};
        }""",
        RENDERING_ENGINE,
    )


def image_to_page(page: Any, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Image (column, row) coordinates of the displayed image, as page pixels, by
    cornerstone's own transform (``imageToWorldCoords`` then ``worldToCanvas``)."""
    found = page.evaluate(
        """([engineId, points]) => {
            const cs = window.cornerstone;
            const viewport = cs.getRenderingEngine(engineId).getViewports()[0];
            const imageId = viewport.getCurrentImageId();
            const r = viewport.element.getBoundingClientRect();
            return points.map(([x, y]) => {
                const world = cs.utilities.imageToWorldCoords(imageId, [x, y]);
                const [cx, cy] = viewport.worldToCanvas(world);
                return [r.x + cx, r.y + cy];
            });
        }""",
        [RENDERING_ENGINE, [list(p) for p in points]],
    )
    return [(float(x), float(y)) for x, y in found]


def outline_drawn(
    before: Any, after: Any, corners: list[tuple[float, float]], band: int = 3, step: int = 4
) -> list[float]:
    """For each edge of the axis-aligned box with page-pixel ``corners`` (top left, bottom
    right, relative to the arrays' origin): the fraction of points along it where some pixel
    within ``band`` pixels across the edge changed from ``before`` to ``after``."""
    import numpy as np

    changed = np.abs(after - before).max(axis=2) > 40
    height, width = changed.shape
    (x0, y0), (x1, y1) = corners
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    fractions = []
    for horizontal, fixed, start, stop in (
        (True, y0, x0, x1),
        (True, y1, x0, x1),
        (False, x0, y0, y1),
        (False, x1, y0, y1),
    ):
        # Leave out the corners, where the tool draws its handles.
        along = np.arange(start + 12, stop - 12, step)
        hits = []
        for t in along:
            lo, hi = int(round(fixed)) - band, int(round(fixed)) + band + 1
            if horizontal:
                column = int(round(t))
                if not 0 <= column < width:
                    continue
                hits.append(bool(changed[max(lo, 0) : min(hi, height), column].any()))
            else:
                row = int(round(t))
                if not 0 <= row < height:
                    continue
                hits.append(bool(changed[row, max(lo, 0) : min(hi, width)].any()))
        fractions.append(sum(hits) / len(hits) if hits else 0.0)
    return fractions
