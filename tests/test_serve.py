"""The page server: MIME types, isolation headers, and no way out of the served folders."""
from __future__ import annotations

import http.client
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from mlx_refusal.errors import UserError
from mlx_refusal.serve import (
    PAGE_DIR, PAGE_FILES, VENDOR, Forbidden, Site, copy_page, install_runtime, make_server, sync_vendor, url_parts,
)

SECRET = "top-secret-do-not-serve"


def _fake_runtime(root: Path) -> tuple[Path, Path]:
    """A page folder and a node_modules tree with the whitelisted vendor files (plus decoys)."""
    page = root / "page"
    page.mkdir()
    for name in PAGE_FILES:
        (page / name).write_text(f"page {name}")
    (page / "package.json").write_text('{"private": true}')  # must not be served
    nm = page / "node_modules"
    for vendor, (package, files) in VENDOR.items():
        d = nm / package
        d.mkdir(parents=True)
        for f in files:
            (d / f).write_bytes(b"\0asm" if f.endswith(".wasm") else f"// {vendor} {f}".encode())
        (d / "not-whitelisted.js").write_text("// decoy")
    return page, nm


@pytest.fixture()
def site(tmp_path):
    (tmp_path / "secret.txt").write_text(SECRET)
    page, nm = _fake_runtime(tmp_path)
    web = tmp_path / "bundle"
    (web / "onnx").mkdir(parents=True)
    (web / "config.json").write_text('{"hidden_size": 64}')
    (web / "onnx" / "model.onnx").write_bytes(b"\x08\x07onnx")
    (web / ".hidden").write_text(SECRET)
    (web / "sub").mkdir()
    (web / "sub" / "index.html").write_text("sub page")
    os.symlink(tmp_path / "secret.txt", web / "escape.txt")
    return web, page, nm


@pytest.fixture()
def server(site):
    web, page, nm = site
    srv = make_server(web, port=0, page_dir=page, node_modules=nm)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, path: str, method: str = "GET"):
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    # skip_host + a raw path: http.client sends the target byte for byte, unnormalised
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", f"{host}:{port}")
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


def test_binds_localhost_by_default(site):
    web, page, nm = site
    srv = make_server(web, port=0, page_dir=page, node_modules=nm)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()


@pytest.mark.parametrize(
    "path, mime, body",
    [
        ("/", "text/html; charset=utf-8", b"page index.html"),
        ("/index.html", "text/html; charset=utf-8", b"page index.html"),
        ("/app.js", "text/javascript; charset=utf-8", b"page app.js"),
        ("/style.css", "text/css; charset=utf-8", b"page style.css"),
        ("/config.json", "application/json", b'{"hidden_size": 64}'),
        ("/onnx/model.onnx", "application/octet-stream", b"\x08\x07onnx"),
        ("/vendor/ort/ort-wasm-simd-threaded.wasm", "application/wasm", b"\0asm"),
        ("/vendor/ort/ort-wasm-simd-threaded.mjs", "text/javascript; charset=utf-8", None),
        ("/vendor/ort/ort.wasm.min.mjs", "text/javascript; charset=utf-8", None),
        ("/vendor/transformers/transformers.min.js", "text/javascript; charset=utf-8", None),
        ("/config.json?v=3", "application/json", b'{"hidden_size": 64}'),
    ],
)
def test_mime_types_and_isolation_headers(server, path, mime, body):
    resp, got = request(server, path)
    assert resp.status == 200, path
    assert resp.getheader("Content-Type") == mime
    assert resp.getheader("Cross-Origin-Opener-Policy") == "same-origin"
    assert resp.getheader("Cross-Origin-Embedder-Policy") == "require-corp"
    assert int(resp.getheader("Content-Length")) == len(got)
    if body is not None:
        assert got == body


def test_head_has_headers_and_no_body(server):
    resp, got = request(server, "/onnx/model.onnx", method="HEAD")
    assert resp.status == 200 and got == b""
    assert resp.getheader("Content-Length") == str(len(b"\x08\x07onnx"))


def test_bundle_copy_of_page_wins_over_repo_page(server, site):
    web, _, _ = site
    (web / "app.js").write_text("bundle copy")
    assert request(server, "/app.js")[1] == b"bundle copy"


def test_folder_without_slash_redirects_and_404_keeps_headers(server):
    resp, _ = request(server, "/sub")
    assert resp.status == 301 and resp.getheader("Location") == "/sub/"
    assert request(server, "/sub/")[1] == b"sub page"
    resp, _ = request(server, "/nope.json")
    assert resp.status == 404
    assert resp.getheader("Cross-Origin-Embedder-Policy") == "require-corp"


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/%2e%2e%2fsecret.txt",
        "/onnx/..%2f..%2fsecret.txt",
        "/onnx/%2e%2e/%2e%2e/secret.txt",
        "/..%5csecret.txt",
        "/onnx%5c..%5c..%5csecret.txt",
        "/secret.txt%00.json",
        "/.hidden",
        "/%2ehidden",
        "/escape.txt",  # a symlink inside the bundle pointing outside it
        "/vendor/ort/..%2f..%2f..%2f..%2fsecret.txt",
        "http://127.0.0.1/../secret.txt",
        "/%ff%fe",
    ],
)
def test_traversal_is_forbidden(server, path):
    resp, got = request(server, path)
    assert resp.status == 403, (path, resp.status)
    assert SECRET.encode() not in got


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "//etc/passwd",
        "///etc/passwd",
        "/secret.txt",
        "/package.json",  # in the page folder, but not a page file
        "/node_modules/onnxruntime-web/dist/ort.wasm.min.mjs",
        "/vendor/ort/not-whitelisted.js",
        "/vendor/other/x.js",
    ],
)
def test_outside_paths_are_not_found(server, path):
    resp, got = request(server, path)
    assert resp.status == 404, (path, resp.status)
    assert SECRET.encode() not in got


def test_url_parts_rejects_dot_segments():
    assert url_parts("/a//b/c.json?x=1#y") == ["a", "b", "c.json"]
    assert url_parts("/") == []
    for bad in ("/a/../b", "/a/%2E%2E/b", "/./a", "a/b", "/a\\b", "/C:/x"):
        with pytest.raises(Forbidden):
            url_parts(bad)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["..", ".", "%2e", "%2E", "%2f", "%5c", "/", "%00", "onnx", "secret.txt",
                                 "escape.txt", "vendor", "ort", "sub", "config.json", "~", "%25"]),
                max_size=8))
def test_lookup_never_leaves_the_roots(site, pieces):
    web, page, nm = site
    s = Site(web.resolve(), page, nm)
    roots = [web.resolve(), page.resolve(), nm.resolve()]
    path = "/" + "".join(pieces)
    try:
        found = s.lookup(path)
    except Forbidden:
        return
    if found is not None:
        real = found.resolve()
        assert any(r == real or r in real.parents for r in roots), (path, real)
        assert real.read_text(errors="replace") != SECRET


def test_missing_runtime_is_a_user_error(site, tmp_path):
    web, page, _ = site
    empty = tmp_path / "empty_nm"
    empty.mkdir()
    with pytest.raises(UserError, match="setup_web.sh"):
        make_server(web, port=0, page_dir=page, node_modules=empty)
    with pytest.raises(UserError, match="not a folder"):
        make_server(tmp_path / "no-such-bundle", port=0, page_dir=page, node_modules=empty)


def test_copied_page_serves_without_node_modules(site, tmp_path):
    web, page, nm = site
    written = copy_page(web, page_dir=page, node_modules=nm)
    assert "index.html" in written and "vendor/ort/ort-wasm-simd-threaded.wasm" in written
    empty = tmp_path / "empty"
    empty.mkdir()
    srv = make_server(web, port=0, page_dir=empty, node_modules=empty)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        resp, got = request(srv, "/vendor/ort/ort-wasm-simd-threaded.wasm")
        assert resp.status == 200 and got == b"\0asm"
        assert resp.getheader("Content-Type") == "application/wasm"
        assert request(srv, "/")[1] == b"page index.html"
    finally:
        srv.shutdown()
        srv.server_close()


def test_cli_serve_reports_a_missing_folder(tmp_path):
    from click.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.main, ["serve", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "not a folder" in result.output


def test_sync_vendor_lets_the_repo_page_serve_without_node_modules(tmp_path):
    page, nm = _fake_runtime(tmp_path)
    written = sync_vendor(page_dir=page, node_modules=nm)
    assert "vendor/ort/ort.wasm.min.mjs" in written
    assert sync_vendor(page_dir=page, node_modules=nm) == []  # unchanged files are not rewritten
    assert not (page / "vendor" / "ort" / "not-whitelisted.js").exists()
    web = tmp_path / "bundle"
    web.mkdir()
    site = Site(web, page, tmp_path / "no_node_modules")
    assert site.missing() == []
    assert site.lookup("/vendor/ort/ort-wasm-simd-threaded.wasm") == page / "vendor" / "ort" / "ort-wasm-simd-threaded.wasm"


def test_install_runtime_names_what_is_missing(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="package-lock.json is missing"):
        install_runtime(page_dir=tmp_path)
    (tmp_path / "package-lock.json").write_text("{}")
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    with pytest.raises(UserError, match="npm is missing"):
        install_runtime(page_dir=tmp_path)


@pytest.mark.browser
def test_install_runtime_from_the_lockfile_makes_a_fresh_page_servable(tmp_path):
    """What `serve` does on a fresh clone: npm ci from the pinned lockfile, then the vendor copy."""
    import shutil

    if shutil.which("npm") is None:
        pytest.skip("npm is missing (apt-get install npm)")
    page = tmp_path / "export"
    page.mkdir()
    for name in ("package.json", "package-lock.json", *PAGE_FILES):
        shutil.copyfile(PAGE_DIR / name, page / name)
    web = tmp_path / "bundle"
    web.mkdir()
    assert Site(web, page, page / "node_modules").missing()
    written = install_runtime(page_dir=page)
    assert "vendor/ort/ort-wasm-simd-threaded.wasm" in written
    assert Site(web, page, page / "node_modules").missing() == []


def _npm_page(folder: Path) -> Path:
    """A page folder as the repo's export/ or a wheel's mlx_refusal/data/export holds it."""
    folder.mkdir(parents=True)
    for name in (*PAGE_FILES, "package.json", "package-lock.json", ".npmrc"):
        (folder / name).write_text(f"{name} of {folder.name}")
    return folder


@pytest.fixture()
def fake_npm(tmp_path, monkeypatch):
    """`npm ci` recorded, not run: it 'installs' the whitelisted vendor files into its cwd."""
    import subprocess

    import mlx_refusal.serve as serve_module

    ran = []

    def run(args, cwd, **_kw):
        ran.append(Path(cwd))
        for vendor, (package, files) in VENDOR.items():
            (Path(cwd) / "node_modules" / package).mkdir(parents=True, exist_ok=True)
            for f in files:
                (Path(cwd) / "node_modules" / package / f).write_text(f"// {vendor} {f}")
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(serve_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(serve_module.subprocess, "run", run)
    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path / "cache"))
    return ran


def _bundle(tmp_path) -> Path:
    web = tmp_path / "bundle"
    web.mkdir()
    (web / "config.json").write_text("{}")
    return web


def test_serve_installs_the_runtime_beside_a_checkouts_page(fake_npm, tmp_path):
    from mlx_refusal.serve import is_installed_copy, runtime_page

    assert not is_installed_copy(PAGE_DIR)  # this checkout's export/
    page = _npm_page(tmp_path / "repo" / "export")
    assert not is_installed_copy(page)
    assert runtime_page(_bundle(tmp_path), page) == page
    assert fake_npm == [page]  # npm ci ran in export/ itself, as before
    assert (page / "vendor" / "ort" / "ort.wasm.min.mjs").is_file()
    assert not (tmp_path / "cache" / "page").exists()


@pytest.mark.parametrize("where", ["site-packages", "read-only"])
def test_serve_of_an_installed_page_installs_the_runtime_into_a_cached_copy(where, fake_npm, tmp_path, monkeypatch):
    import mlx_refusal.serve as serve_module
    from mlx_refusal.serve import is_installed_copy, runtime_page

    if where == "site-packages":
        page = _npm_page(tmp_path / "lib" / "python3.12" / "site-packages" / "mlx_refusal" / "data" / "export")
    else:
        page = _npm_page(tmp_path / "opt" / "export")
        access = os.access  # root may write anywhere: say what a user would be told
        monkeypatch.setattr(serve_module.os, "access",
                            lambda p, mode: False if Path(p).resolve() == page.resolve() else access(p, mode))
    before = sorted(p.relative_to(page) for p in page.rglob("*"))
    assert is_installed_copy(page)
    web = _bundle(tmp_path)
    copy = runtime_page(web, page)
    assert copy.parent == tmp_path / "cache" / "page" and fake_npm == [copy]
    assert sorted(p.relative_to(page) for p in page.rglob("*")) == before  # the installed page is untouched
    for name in (*PAGE_FILES, "package-lock.json", ".npmrc"):
        assert (copy / name).read_text() == (page / name).read_text()
    assert Site(web.resolve(), copy, copy / "node_modules").missing() == []
    # the next serve reuses the installed copy: no second npm ci
    assert runtime_page(web, page) == copy and fake_npm == [copy]

    # and `serve` hands the server that copy, page and runtime
    handed = {}

    class Stop(Exception):
        pass

    def make_server(webdir, host, port, log=None, page_dir=None, node_modules=None):
        handed.update(page_dir=page_dir, node_modules=node_modules)
        raise Stop

    monkeypatch.setattr(serve_module, "PAGE_DIR", page)
    monkeypatch.setattr(serve_module, "make_server", make_server)
    with pytest.raises(Stop):
        serve_module.serve(web, port=0)
    assert handed == {"page_dir": copy, "node_modules": copy / "node_modules"}


def test_serve_runs_no_npm_when_the_bundle_carries_the_runtime(fake_npm, tmp_path, site):
    from mlx_refusal.serve import runtime_page

    web, page, nm = site
    copy_page(web, page_dir=page, node_modules=nm)
    installed = _npm_page(tmp_path / "site-packages" / "export")
    assert runtime_page(web, installed) == installed and fake_npm == []


def test_export_with_page_from_an_installed_package_takes_the_runtime_from_its_cached_copy(
        fake_npm, tmp_path, monkeypatch, tiny_qwen2):
    """`export-onnx --with-page` of a wheel install: the page's runtime is installed into the
    cached copy of the page (never into site-packages), and the bundle carries it from there."""
    import mlx_refusal.serve as serve_module
    from mlx_refusal import api

    page = _npm_page(tmp_path / "lib" / "site-packages" / "mlx_refusal" / "data" / "export")
    before = sorted(p.relative_to(page) for p in page.rglob("*"))
    monkeypatch.setattr(serve_module, "PAGE_DIR", page)
    out = api.export_onnx(tiny_qwen2, tmp_path / "web", dtypes="fp32", with_page=True).out_dir
    assert len(fake_npm) == 1 and fake_npm[0].parent == tmp_path / "cache" / "page"
    assert sorted(p.relative_to(page) for p in page.rglob("*")) == before
    assert (out / "index.html").read_text() == f"index.html of {page.name}"
    for vendor, (package, files) in VENDOR.items():
        for f in files:
            assert (out / "vendor" / vendor / f).read_text() == f"// {vendor} {f}"
