"""A small local static server for the web page, an exported bundle and the page's JS runtime.

URL layout (the same as a bundle folder written by `export-onnx --with-page`, so the page works
unchanged from any static host):

    /                       index.html, app.js, style.css   (the bundle's copy, else the repo's export/)
    /config.json, /onnx/... the bundle (WEBDIR)
    /vendor/transformers/   transformers.js (tokenizer + chat template)
    /vendor/ort/            onnxruntime-web (the wasm inference runtime)

Vendor files come from WEBDIR/vendor when the bundle carries a copy, else from the npm packages
installed under export/node_modules (which `install_runtime` puts there on first use, from the
pinned export/package-lock.json, and copies the few files the page needs into export/vendor, so
that `export-onnx --with-page` can ship them). Nothing is fetched from a CDN at page time.
An installed package's export/ (in site-packages, or not writable) is never written to: `serve`
copies the page into the per-user cache and installs the runtime there (`runtime_page`).

Every response carries COOP `same-origin` + COEP `require-corp`: that makes the page
cross-origin isolated, which SharedArrayBuffer (and so onnxruntime-web's wasm threads) requires.
Only files inside the served roots are reachable: `..`, encoded `..`, backslashes, NUL bytes and
symlinks that leave a root are refused, and dotfiles are never served.
"""
from __future__ import annotations

import email.utils
import ipaddress
import os
import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from .errors import UserError
from .paths import cache_dir
from .record import files_sha256
from .resources import data_dir

PAGE_DIR = data_dir("export")
NODE_MODULES = PAGE_DIR / "node_modules"
PAGE_FILES = ("index.html", "app.js", "style.css")
# what `npm ci` reads besides: a copy of the page for npm holds these too (.npmrc: install scripts off)
NPM_FILES = ("package.json", "package-lock.json", ".npmrc")

# vendor/<name>/<file> -> the npm package folder that holds it. Only these files are served or
# copied: the page imports transformers.min.js (self-contained ES module) and ort.wasm.min.mjs,
# which loads its wasm glue + binary from the same folder (env.wasm.wasmPaths). ort.webgpu.min.mjs
# and the asyncify build are for WebGPU (where the browser has it) and for transformers.js's own
# pipeline, whose bundled runtime asks for them.
VENDOR = {
    "transformers": ("@huggingface/transformers/dist", ("transformers.min.js",)),
    "ort": ("onnxruntime-web/dist", ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
                                     "ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs",
                                     "ort-wasm-simd-threaded.asyncify.wasm")),
}
# License texts copied beside vendored code when the page is written next to a bundle.
VENDOR_LICENSES = {"transformers": "@huggingface/transformers/LICENSE"}

MIME_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".onnx": "application/octet-stream",
    ".onnx_data": "application/octet-stream",
    ".data": "application/octet-stream",
    ".safetensors": "application/octet-stream",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".map": "application/json",
}

ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Forbidden(Exception):
    """The request path tries to leave the served roots (or is malformed)."""


@dataclass(frozen=True)
class Site:
    """What one server instance serves: the bundle folder, the page, the vendored runtime."""

    webdir: Path
    page_dir: Path = PAGE_DIR
    node_modules: Path = NODE_MODULES

    def lookup(self, url_path: str) -> Path | None:
        """The file a request path names, or None (404). Raises Forbidden on traversal attempts.

        Directories resolve to their index.html.
        """
        parts = url_parts(url_path)
        for root, rel in self._candidates(parts):
            path = _inside(root, rel)
            if path is None:
                continue
            if path.is_dir():
                path = path / "index.html"
            if path.is_file():
                return path
        return None

    def _candidates(self, parts: list[str]):
        # 1. the bundle folder itself (it may carry its own copy of the page and vendor files)
        yield self.webdir, parts
        # 2. the page from the repo
        if not parts:
            yield self.page_dir, ["index.html"]
        elif len(parts) == 1 and parts[0] in PAGE_FILES:
            yield self.page_dir, parts
        # 3. the runtime (whitelisted files only): the installed npm package, else export/vendor
        if len(parts) == 3 and parts[0] == "vendor" and parts[1] in VENDOR:
            package, files = VENDOR[parts[1]]
            if parts[2] in files:
                yield self.node_modules / package, [parts[2]]
                yield self.page_dir / "vendor" / parts[1], [parts[2]]

    def missing(self) -> list[str]:
        """What the page needs that neither the bundle nor the repo provides (empty when servable)."""
        out = []
        if self.lookup("/index.html") is None or self.lookup("/app.js") is None:
            out.append(f"the page (index.html, app.js): not in {self.webdir} nor {self.page_dir}")
        for name, (_, files) in VENDOR.items():
            for f in files:
                if self.lookup(f"/vendor/{name}/{f}") is None:
                    out.append(f"vendor/{name}/{f}")
        return out


def url_parts(url_path: str) -> list[str]:
    """Split a request target into safe path segments. Raises Forbidden on anything suspicious."""
    if not url_path.startswith("/"):
        raise Forbidden("request target is not an origin-relative path")
    path = url_path.split("?", 1)[0].split("#", 1)[0]
    try:
        path = urllib.parse.unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise Forbidden("path is not valid UTF-8") from None
    parts = []
    for part in path.split("/"):
        if part == "":
            continue  # collapse '//' (never an absolute filesystem path)
        if part in (".", "..") or "\\" in part or "\x00" in part or ":" in part:
            raise Forbidden(f"path segment {part!r} is not allowed")
        if part.startswith("."):
            raise Forbidden("dotfiles are not served")
        parts.append(part)
    return parts


def _inside(root: Path, parts: list[str]) -> Path | None:
    """root/parts if it exists and, symlinks resolved, still lies inside root."""
    try:
        base = root.resolve(strict=True)
        path = base.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if path != base and base not in path.parents:
        raise Forbidden("path resolves outside the served folder")
    return path


def mime_type(path: Path) -> str:
    return MIME_TYPES.get(path.suffix.lower(), "application/octet-stream")


class PageRequestHandler(BaseHTTPRequestHandler):
    """GET/HEAD only, no directory listings, isolation headers on every response."""

    server_version = "mlx-refusal"
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries a Content-Length
    site: Site  # set on the subclass made by make_server
    log: Callable[[str], None] | None = None

    def version_string(self):
        return self.server_version

    def do_GET(self):
        self._respond(send_body=True)

    def do_HEAD(self):
        self._respond(send_body=False)

    def _respond(self, send_body: bool):
        try:
            path = self.site.lookup(self.path)
        except Forbidden:
            return self._error(HTTPStatus.FORBIDDEN)
        if path is None:
            return self._error(HTTPStatus.NOT_FOUND)
        url_dir = self.path.split("?", 1)[0]
        if path.name == "index.html" and url_dir not in ("/", "") and not url_dir.endswith(("/", ".html")):
            # a folder named without its trailing slash: redirect so the page's relative URLs work
            self.send_response(HTTPStatus.MOVED_PERMANENTLY)
            self.send_header("Location", url_dir + "/")
            self.send_header("Content-Length", "0")
            self._common_headers()
            self.end_headers()
            return
        stat = path.stat()
        modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
        if self.headers.get("If-Modified-Since") == modified:
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self._common_headers()
            self.end_headers()
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", mime_type(path))
        self.send_header("Content-Length", str(stat.st_size))
        self.send_header("Last-Modified", modified)
        self._common_headers()
        self.end_headers()
        if send_body:
            with open(path, "rb") as f:
                try:
                    shutil.copyfileobj(f, self.wfile, 1 << 20)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the browser went away mid-download (reload, tab closed)

    def _common_headers(self):
        for key, value in ISOLATION_HEADERS.items():
            self.send_header(key, value)
        # revalidate every time (Last-Modified makes that cheap): a re-export must never be
        # shadowed by a stale cached model
        self.send_header("Cache-Control", "no-cache")

    def _error(self, status: HTTPStatus):
        body = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self._common_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 (stdlib signature)
        if self.log is not None:
            self.log(f"{self.address_string()} {format % args}")


def install_runtime(page_dir: Path = PAGE_DIR, progress: Callable[[str], None] | None = None) -> list[str]:
    """Install the page's pinned JS runtime: `npm ci` from export/package-lock.json (install scripts
    off: transformers.js pulls in onnxruntime-node, whose script downloads native binaries the page
    never uses), then copy the files the page loads into export/vendor. Returns the files copied."""
    page_dir = Path(page_dir)
    if not (page_dir / "package-lock.json").is_file():
        raise UserError(f"cannot install the page's runtime: {page_dir / 'package-lock.json'} is missing; "
                        "restore export/ from the repository")
    npm = shutil.which("npm")
    if npm is None:
        raise UserError("cannot install the page's runtime: npm is missing. Fix: install Node.js and npm "
                        "(Debian: apt-get install nodejs npm), or run `bash scripts/setup_web.sh`")
    if progress is not None:
        progress(f"installing the page's pinned runtime (npm ci in {page_dir})")
    proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=page_dir,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"`npm ci` in {page_dir} failed ({tail[0]}); check the network to the npm registry, "
                        "or run `bash scripts/setup_web.sh`")
    return sync_vendor(page_dir, page_dir / "node_modules")


def is_installed_copy(page_dir: Path) -> bool:
    """Whether `page_dir` belongs to an installed package (the wheel's mlx_refusal/data/export, or
    any folder under site-packages) or cannot be written: no place for `npm ci`'s node_modules.
    A source checkout's export/ is neither, and keeps its node_modules beside the page."""
    page_dir = Path(page_dir).resolve()
    package = Path(__file__).resolve().parent
    inside = {page_dir, *page_dir.parents}
    return (package in inside or any(p.name in ("site-packages", "dist-packages") for p in inside)
            or not os.access(page_dir, os.W_OK | os.X_OK))


def page_copy(page_dir: Path = PAGE_DIR) -> Path:
    """A per-user copy of the page and its npm files, in the cache, in a folder named by their
    content: each installed version gets its own, and reinstalling the same one reuses it."""
    page_dir = Path(page_dir)
    sources = [page_dir / name for name in (*PAGE_FILES, *NPM_FILES) if (page_dir / name).is_file()]
    copy = cache_dir("page", files_sha256(sources)[:16])
    for src in sources:
        target = copy / src.name
        if not (target.is_file() and _same_file_content(src, target)):
            shutil.copyfile(src, target)
    return copy


def runtime_page(webdir: str | os.PathLike, page_dir: Path = PAGE_DIR,
                 progress: Callable[[str], None] | None = None) -> Path:
    """The page folder to serve `webdir` with: `page_dir`, unless neither the bundle nor the page
    has the runtime, in which case `page_with_runtime` installs it."""
    page_dir = Path(page_dir)
    webdir = Path(webdir)
    if not webdir.is_dir() or not _lacks_runtime(webdir, page_dir):
        return page_dir  # nothing to install (make_server reports a missing folder)
    return page_with_runtime(page_dir, progress)


def page_with_runtime(page_dir: Path = PAGE_DIR, progress: Callable[[str], None] | None = None) -> Path:
    """A page folder whose JS runtime is installed (`install_runtime`, on first use): `page_dir`
    itself, or, for an installed package's page (`is_installed_copy`), its copy in the cache
    (`page_copy`), where npm may write."""
    page_dir = Path(page_dir)
    if not _lacks_runtime(page_dir, page_dir):
        return page_dir
    page = page_copy(page_dir) if is_installed_copy(page_dir) else page_dir
    if page == page_dir or _lacks_runtime(page, page):
        install_runtime(page, progress=progress)
    return page


def _lacks_runtime(webdir: Path, page: Path) -> bool:
    missing = Site(webdir.resolve(), page, page / "node_modules").missing()
    return any(m.startswith("vendor/") for m in missing)


def _cannot_listen(host: str, port: int, exc: OSError) -> UserError:
    return UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another port with --port")


def check_listenable(webdir: str | os.PathLike, host: str, port: int) -> None:
    """The one-line errors of `make_server` that need no page: `webdir` not a folder, or the
    address taken (bound and let go at once, with the server's own SO_REUSEADDR)."""
    if not Path(webdir).is_dir():
        raise UserError(f"{webdir} is not a folder; pass the folder written by `export-onnx --out`")
    import socket

    with socket.socket(ThreadingHTTPServer.address_family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise _cannot_listen(host, port, exc) from None


def make_server(
    webdir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    log: Callable[[str], None] | None = None,
    page_dir: Path = PAGE_DIR,
    node_modules: Path = NODE_MODULES,
) -> ThreadingHTTPServer:
    """A bound (not yet running) server for `webdir`; port 0 picks a free port
    (read it back from `server.server_address`)."""
    webdir = Path(webdir)
    check_listenable(webdir, host, port)
    site = Site(webdir.resolve(), Path(page_dir), Path(node_modules))
    handler = type("Handler", (PageRequestHandler,), {"site": site, "log": staticmethod(log) if log else None})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:  # taken since check_listenable
        raise _cannot_listen(host, port, exc) from None
    missing = site.missing()
    if missing:
        server.server_close()
        raise UserError(
            "cannot serve the page, missing: " + "; ".join(missing)
            + ". Fix: run `bash scripts/setup_web.sh` (installs the pinned JS runtime into export/node_modules)"
        )
    server.daemon_threads = True
    return server


def serve(
    webdir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    log: Callable[[str], None] | None = None,
    on_ready: Callable[[str], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Serve the page + bundle in `webdir` until interrupted. `on_ready(url)` is called once listening.
    When neither the bundle nor the page has the page's runtime, it is installed first
    (`runtime_page`: into export/ in a checkout, else into a cached copy of the page; it reports
    to `progress`)."""
    check_listenable(webdir, host, port)  # before the runtime's install, which takes minutes
    page = runtime_page(webdir, PAGE_DIR, progress=progress)
    server = make_server(webdir, host, port, log=log, page_dir=page, node_modules=page / "node_modules")
    try:
        if on_ready is not None:
            on_ready(server_url(server))
        server.serve_forever()
    finally:
        server.server_close()


def server_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def copy_page(dest: str | os.PathLike, page_dir: Path = PAGE_DIR, node_modules: Path = NODE_MODULES) -> list[str]:
    """Copy the page and its vendored runtime into `dest` (a bundle folder), so the folder runs
    from any static host. Returns the relative paths written. Call it on the temporary folder
    before the bundle's atomic rename."""
    dest = Path(dest)
    written = []
    for name in PAGE_FILES:
        src = Path(page_dir) / name
        if not src.is_file():
            raise UserError(f"the page file {src} is missing; restore export/ from the repository")
        shutil.copyfile(src, dest / name)
        written.append(name)
    return written + _copy_vendor(dest / "vendor", page_dir, node_modules)


def sync_vendor(page_dir: Path = PAGE_DIR, node_modules: Path = NODE_MODULES) -> list[str]:
    """Copy the runtime files the page needs from node_modules into export/vendor (what
    scripts/setup_web.sh runs after `npm ci`). Returns the relative paths written."""
    return _copy_vendor(Path(page_dir) / "vendor", page_dir, node_modules, only_changed=True)


def _copy_vendor(vendor_dir: Path, page_dir: Path, node_modules: Path, only_changed: bool = False) -> list[str]:
    written = []
    for vendor, (package, files) in VENDOR.items():
        out = vendor_dir / vendor
        out.mkdir(parents=True, exist_ok=True)
        sources = [(Path(node_modules) / package / name, name) for name in files]
        if VENDOR_LICENSES.get(vendor):
            sources.append((Path(node_modules) / VENDOR_LICENSES[vendor], "LICENSE"))
        for src, name in sources:
            if not src.is_file():  # fall back on a copy already in export/vendor
                src = Path(page_dir) / "vendor" / vendor / name
            if not src.is_file():
                if name == "LICENSE":
                    continue
                raise UserError(f"the JS runtime file {name} ({package}) is missing; run `bash scripts/setup_web.sh` first")
            target = out / name
            if src.resolve() == target.resolve():
                continue
            if only_changed and target.is_file() and _same_file_content(src, target):
                continue
            shutil.copyfile(src, target)
            written.append(target.relative_to(vendor_dir.parent).as_posix())
    return written


def _same_file_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                return False
            if not ca:
                return True
