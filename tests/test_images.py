"""ImageFetcher against real local HTTP servers: a fake-but-real Label Studio (auth, uploads, local files,
presign, JWT refresh, error pages, slow endpoints) and a second loopback server standing for "some other host"."""
from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import urllib3.connection
from flask import Flask, Response, redirect, request
from PIL import Image
from werkzeug.serving import make_server

from backend.images import FetchedImage, ImageFetcher, ImageFetchError, is_jwt, redact
from clipseg_model.image_io import to_rgb
from backend.settings import Settings

LEGACY = "0123456789abcdef0123456789abcdef01234567"


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def make_jwt(**claims) -> str:
    """A JWT-shaped token (unsigned: the fake server and the fetcher only read claims)."""
    return f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(claims)}.{_b64({'sig': 'x'})}"


PAT = make_jwt(token_type="refresh", exp=int(time.time()) + 86400, user_id=1)


def png_bytes(size=(32, 24), color=(200, 30, 40), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


class FakeLabelStudio:
    """State of the fake Label Studio server: issued tokens, hit counters, settings tests can change."""

    def __init__(self):
        self.access_tokens: set[str] = set()
        self.access_ttl = 300
        self.refreshes = 0
        self.hits: dict[str, int] = {}
        self.auth_seen: list[str | None] = []
        self.redirect_target = ""  # where presign sends the client (the "bucket")

    def authorized(self) -> bool:
        header = request.headers.get("Authorization", "")
        return header == f"Token {LEGACY}" or (header.startswith("Bearer ") and header[7:] in self.access_tokens)


def build_ls_app(state: FakeLabelStudio) -> Flask:
    app = Flask("fake_label_studio")

    @app.before_request
    def count():
        state.hits[request.full_path] = state.hits.get(request.full_path, 0) + 1
        state.auth_seen.append(request.headers.get("Authorization"))

    def image_or_401(data: bytes):
        if not state.authorized():
            return Response('{"detail": "Authentication credentials were not provided."}', 401, mimetype="application/json")
        return Response(data, mimetype="image/png")

    @app.post("/api/token/refresh/")
    def refresh():
        if (request.get_json(silent=True) or {}).get("refresh") != PAT:
            return {"detail": "Token is invalid or expired"}, 401
        state.refreshes += 1
        access = make_jwt(token_type="access", exp=int(time.time()) + state.access_ttl, jti=state.refreshes)
        state.access_tokens.add(access)
        return {"access": access}

    @app.get("/data/upload/<int:project>/<name>")
    def upload(project, name):
        if name in ("missing.png", "proxied.png"):
            return "not found", 404
        return image_or_401(png_bytes(color=(10, 200, 10)))

    @app.get("/storage-data/uploaded/")
    def storage_proxy():
        if request.args.get("filepath") == "upload/1/proxied.png":
            return image_or_401(png_bytes(color=(1, 2, 3)))
        return "not found", 404

    @app.get("/data/local-files/")
    def local_files():
        if request.args.get("d") != "images/cat.png":
            return "not found", 404
        return image_or_401(png_bytes(size=(16, 16), color=(0, 0, 255)))

    @app.get("/tasks/<int:task_id>/presign/")
    def presign(task_id):
        if not state.authorized():
            return "unauthorized", 401
        uri = base64.urlsafe_b64decode(request.args["fileuri"]).decode()
        if uri != "s3://bucket/dir/cat.png":
            return "no such object", 404
        return redirect(state.redirect_target + "/bucket/dir/cat.png?X-Amz-Signature=secret", 303)

    @app.get("/html")
    def html():
        return "<!doctype html><html><body>Please log in</body></html>"

    @app.get("/html-as-octets")
    def html_octets():
        return Response(b"<html><body>oops</body></html>", mimetype="application/octet-stream")

    @app.get("/garbage")
    def garbage():
        return Response(b"\x00\x01 definitely not an image" * 10, mimetype="image/png")

    @app.get("/slow")
    def slow():
        time.sleep(2.0)
        return Response(png_bytes(), mimetype="image/png")

    @app.get("/trickle")
    def trickle():
        def gen():
            for _ in range(40):
                time.sleep(0.1)
                yield b"\x89"

        return Response(gen(), mimetype="image/png")

    @app.get("/big")
    def big():
        return Response(b"\x89PNG" + b"\x00" * 200_000, mimetype="image/png")

    @app.get("/bomb.png")
    def bomb():
        buf = io.BytesIO()
        Image.new("L", (3000, 3000)).save(buf, format="PNG")  # ~9 kB on the wire, 9 Mpx decoded
        return Response(buf.getvalue(), mimetype="image/png")

    @app.get("/redirect-metadata")
    def redirect_metadata():
        return redirect("http://169.254.169.254/latest/meta-data/iam/security-credentials/", 302)

    @app.get("/redirect-file")
    def redirect_file():
        return redirect("file:///etc/passwd", 302)

    @app.get("/redirect-loop")
    def redirect_loop():
        return redirect("/redirect-loop", 302)

    @app.get("/public/cat.png")
    def public_cat():
        return Response(png_bytes(color=(9, 9, 9)), mimetype="image/png")

    return app


HOSTS_SEEN: list[str | None] = []


def build_other_app(seen: list) -> Flask:
    """Another host: a bucket and a server that redirects elsewhere. Records the Authorization it receives."""
    app = Flask("other_host")

    @app.before_request
    def record():
        seen.append(request.headers.get("Authorization"))
        HOSTS_SEEN.append(request.headers.get("Host"))

    @app.get("/bucket/dir/cat.png")
    def bucket():
        if request.args.get("X-Amz-Signature") != "secret":
            return "forbidden", 403
        return Response(png_bytes(color=(255, 255, 0)), mimetype="image/png")

    @app.get("/cat.png")
    def cat():
        return Response(png_bytes(color=(0, 255, 255)), mimetype="image/png")

    @app.get("/to-metadata")
    def to_metadata():
        return redirect("http://169.254.169.254/latest/meta-data/", 302)

    @app.get("/to-unlisted")
    def to_unlisted():
        return redirect("http://unlisted.example/cat.png", 302)

    return app


class _Server:
    def __init__(self, app: Flask):
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def servers():
    state = FakeLabelStudio()
    other_seen: list = []
    ls = _Server(build_ls_app(state))
    other = _Server(build_other_app(other_seen))
    yield state, ls, other, other_seen
    ls.close()
    other.close()


@pytest.fixture
def ls(servers):
    state, ls_server, other, other_seen = servers
    state.access_tokens.clear()
    state.access_ttl = 300
    state.refreshes = 0
    state.hits.clear()
    state.auth_seen.clear()
    state.redirect_target = other.url
    other_seen.clear()
    return state, ls_server, other, other_seen


@pytest.fixture
def no_connect(monkeypatch):
    """Fails the test if any socket connection is attempted; returns the list of attempted addresses."""
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise AssertionError(f"connection attempted to {address}")

    monkeypatch.setattr(urllib3.connection.connection, "create_connection", refuse)
    return attempts


def fetcher(base, key=LEGACY, **kwargs) -> ImageFetcher:
    kwargs.setdefault("timeout", 5.0)
    return ImageFetcher(base, key, **kwargs)


# -- auth and Label Studio references ----------------------------------------------------------------------


def test_upload_with_legacy_token(ls):
    state, server, _, _ = ls
    img = fetcher(server.url).fetch("/data/upload/1/cat.png")
    assert isinstance(img, FetchedImage)
    assert img.image.mode == "RGB" and (img.width, img.height) == (32, 24)
    assert img.image.getpixel((0, 0)) == (10, 200, 10)
    assert state.auth_seen == [f"Token {LEGACY}"]


def test_upload_without_data_prefix_and_local_files(ls):
    _, server, _, _ = ls
    f = fetcher(server.url)
    assert f.fetch("upload/1/cat.png").image.getpixel((0, 0)) == (10, 200, 10)
    img = f.fetch("/data/local-files/?d=images/cat.png")
    assert (img.width, img.height) == (16, 16) and img.image.getpixel((3, 3)) == (0, 0, 255)


def test_wrong_legacy_token_gives_401_with_hint(ls):
    _, server, _, _ = ls
    with pytest.raises(ImageFetchError) as err:
        fetcher(server.url, key="wrong").fetch("/data/upload/1/cat.png")
    assert err.value.status == 401 and "personal access token" in err.value.message


def test_personal_access_token_is_refreshed_and_cached(ls):
    state, server, _, _ = ls
    assert is_jwt(PAT) and not is_jwt(LEGACY)
    f = fetcher(server.url, key=PAT)
    f.fetch("/data/upload/1/a.png")
    f.fetch("/data/upload/1/b.png")
    assert state.refreshes == 1  # the access token is reused while valid
    assert all(a.startswith("Bearer ") and a[7:] in state.access_tokens for a in state.auth_seen if a)
    assert PAT not in "".join(a or "" for a in state.auth_seen)  # the PAT itself only goes to /api/token/refresh/


def test_access_token_renewed_before_expiry(ls):
    state, server, _, _ = ls
    state.access_ttl = 5  # inside the renewal margin: each use refreshes first
    f = fetcher(server.url, key=PAT)
    f.fetch("/data/upload/1/a.png")
    f.fetch("/data/upload/1/b.png")
    assert state.refreshes == 2


def test_401_refreshes_once_and_retries(ls):
    state, server, _, _ = ls
    f = fetcher(server.url, key=PAT)
    f.fetch("/data/upload/1/a.png")
    state.access_tokens.clear()  # revoke: the cached token now gets 401
    f.fetch("/data/upload/1/b.png")
    assert state.refreshes == 2


def test_bad_pat_refresh_fails_cleanly(ls):
    _, server, _, _ = ls
    bad = make_jwt(token_type="refresh", exp=int(time.time()) + 100, user_id=2)
    with pytest.raises(ImageFetchError) as err:
        fetcher(server.url, key=bad).fetch("/data/upload/1/a.png")
    assert err.value.status == 401 and "refresh" in err.value.message


def test_tokens_never_logged(ls, caplog):
    state, server, _, _ = ls
    caplog.set_level(logging.DEBUG)
    f = fetcher(server.url, key=PAT)
    f.fetch("/data/upload/1/a.png")
    with pytest.raises(ImageFetchError):
        f.fetch("/data/upload/1/missing.png")
    text = caplog.text
    assert PAT not in text and not any(t in text for t in state.access_tokens)
    assert LEGACY not in text


def test_setup_credentials_fill_in_but_settings_win(ls):
    _, server, _, _ = ls
    f = ImageFetcher.from_settings(Settings(), hostname=server.url, access_token=LEGACY)
    assert f.fetch("/data/upload/1/a.png").width == 32
    f2 = ImageFetcher.from_settings(Settings(label_studio_url=server.url, label_studio_api_key="wrong"))
    f2.use_setup_credentials("http://elsewhere:1", LEGACY)
    assert f2.base_url == server.url
    with pytest.raises(ImageFetchError) as err:
        f2.fetch("/data/upload/1/a.png")
    assert err.value.status == 401


def test_relative_reference_without_base_url():
    with pytest.raises(ImageFetchError) as err:
        ImageFetcher().fetch("/data/upload/1/a.png")
    assert err.value.status == 400 and "LABEL_STUDIO_URL" in err.value.message


def test_upload_404_falls_back_to_storage_proxy(ls):
    state, server, _, _ = ls
    img = fetcher(server.url).fetch("/data/upload/1/proxied.png")
    assert img.image.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ImageFetchError) as err:
        fetcher(server.url).fetch("/data/upload/1/missing.png")
    assert err.value.status == 404


# -- cloud storage ---------------------------------------------------------------------------------------------


def test_presign_redirect_to_bucket_without_auth(ls):
    state, server, other, other_seen = ls
    # The bucket is on a loopback port here, so private networks must be allowed; it is NOT in allowed_hosts:
    # a redirect issued by Label Studio itself may leave the list.
    f = fetcher(server.url, allow_private_networks=True)
    img = f.fetch("s3://bucket/dir/cat.png", task_id=7)
    assert img.image.getpixel((0, 0)) == (255, 255, 0)
    presign = [p for p in state.hits if p.startswith("/tasks/7/presign/")]
    assert presign and parse_qs(urlsplit(presign[0]).query)["fileuri"] == [
        base64.urlsafe_b64encode(b"s3://bucket/dir/cat.png").decode()
    ]
    assert other_seen == [None]  # no Label Studio credentials leak to the bucket
    f.fetch("s3://bucket/dir/cat.png", task_id=8)  # cached by cloud URI, not by presigned URL
    assert len(other_seen) == 1


def test_presign_redirect_to_private_bucket_refused_by_default(ls):
    _, server, _, other_seen = ls
    with pytest.raises(ImageFetchError) as err:
        fetcher(server.url).fetch("s3://bucket/dir/cat.png", task_id=7)
    assert err.value.status == 403 and other_seen == []


def test_cloud_uri_needs_task_id(ls):
    _, server, _, _ = ls
    for uri in ("s3://bucket/dir/cat.png", "gs://b/x.jpg", "azure-blob://c/x.jpg"):
        with pytest.raises(ImageFetchError) as err:
            fetcher(server.url).fetch(uri)
        assert err.value.status == 400 and "task id" in err.value.message


# -- errors and limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/html", "/html-as-octets"])
def test_html_page_is_a_clear_error(ls, path):
    _, server, _, _ = ls
    with pytest.raises(ImageFetchError) as err:
        fetcher(server.url).fetch(server.url + path)
    assert err.value.status == 415 and "image" in err.value.message


def test_garbage_bytes(ls):
    _, server, _, _ = ls
    with pytest.raises(ImageFetchError) as err:
        fetcher(server.url).fetch(server.url + "/garbage")
    assert err.value.status == 415


def test_slow_endpoint_times_out(ls):
    _, server, _, _ = ls
    start = time.monotonic()
    with pytest.raises(ImageFetchError) as err:
        fetcher(server.url, timeout=0.5).fetch(server.url + "/slow")
    assert err.value.status == 504 and time.monotonic() - start < 1.8


def test_trickling_endpoint_hits_total_deadline(ls):
    _, server, _, _ = ls
    start = time.monotonic()
    with pytest.raises(ImageFetchError) as err:
        fetcher(server.url, timeout=0.6).fetch(server.url + "/trickle")  # each byte within the read timeout
    assert err.value.status == 504 and time.monotonic() - start < 2.0


def test_byte_cap(ls):
    _, server, _, _ = ls
    with pytest.raises(ImageFetchError) as err:
        fetcher(server.url, max_bytes=100_000).fetch(server.url + "/big")
    assert err.value.status == 413


def test_decompression_bomb_refused_before_decoding(ls):
    _, server, _, _ = ls
    with pytest.raises(ImageFetchError) as err:
        fetcher(server.url, max_image_pixels=1_000_000).fetch(server.url + "/bomb.png")
    assert err.value.status == 413 and "3000x3000" in err.value.message
    assert fetcher(server.url, max_image_pixels=10_000_000).fetch(server.url + "/bomb.png").width == 3000


def test_too_many_redirects(ls):
    _, server, _, _ = ls
    with pytest.raises(ImageFetchError) as err:
        fetcher(server.url).fetch(server.url + "/redirect-loop")
    assert err.value.status == 502 and "redirects" in err.value.message


def test_cache_hits_and_byte_bound(ls):
    state, server, _, _ = ls
    f = fetcher(server.url, cache_bytes=len(png_bytes()) * 2 + 10)
    for _ in range(3):
        f.fetch("/data/upload/1/a.png")
    assert state.hits["/data/upload/1/a.png?"] == 1
    f.fetch("/data/upload/1/b.png")
    f.fetch("/data/upload/1/c.png")  # evicts a.png (least recently used)
    assert f.cache_size_bytes <= len(png_bytes()) * 2 + 10
    f.fetch("/data/upload/1/a.png")
    assert state.hits["/data/upload/1/a.png?"] == 2


def test_errors_are_not_cached(ls):
    state, server, _, _ = ls
    f = fetcher(server.url)
    for _ in range(2):
        with pytest.raises(ImageFetchError):
            f.fetch(server.url + "/html")
    assert state.hits["/html?"] == 2


# -- SSRF ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/cat.png",
        "http://[::ffff:169.254.169.254]/x.png",
        "http://0xa9fea9fe/x.png",  # 169.254.169.254 spelled as one hex number
    ],
)
def test_forbidden_addresses_refused_before_connecting(no_connect, url):
    hosts = ("169.254.169.254", "10.0.0.1", "[::ffff:169.254.169.254]", "0xa9fea9fe")
    # Even listed in allowed_hosts, the address check refuses them.
    f = ImageFetcher("http://127.0.0.1:9", LEGACY, allowed_hosts=hosts)
    with pytest.raises(ImageFetchError) as err:
        f.fetch(url)
    assert err.value.status == 403 and "forbidden address" in err.value.message
    assert no_connect == []


def test_unlisted_hosts_refused_before_connecting(no_connect):
    f = ImageFetcher("http://127.0.0.1:9", LEGACY)
    for url in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png", "https://example.com/x.png"):
        with pytest.raises(ImageFetchError) as err:
            f.fetch(url)
        assert err.value.status == 403 and "ALLOWED_IMAGE_HOSTS" in err.value.message
    assert no_connect == []


def test_link_local_refused_even_with_private_networks(no_connect):
    f = ImageFetcher("http://127.0.0.1:9", LEGACY, allowed_hosts=("*",), allow_private_networks=True)
    with pytest.raises(ImageFetchError) as err:
        f.fetch("http://169.254.169.254/latest/meta-data/")
    assert err.value.status == 403 and no_connect == []


@pytest.mark.parametrize("ref", ["file:///etc/passwd", "FILE:///etc/passwd", "gopher://x/", "ftp://x/y.png", "/etc/passwd"])
def test_other_schemes_and_paths_refused(no_connect, ref):
    with pytest.raises(ImageFetchError) as err:
        ImageFetcher("http://127.0.0.1:9", LEGACY).fetch(ref)
    assert err.value.status in (400, 403)
    assert no_connect == []


@pytest.mark.parametrize(
    "ref",
    [
        "/data/upload/../../api/projects",
        "/data/upload/1/%2e%2e/%2e%2e/etc/passwd",
        "/data/local-files/?d=../../etc/passwd",
        "/data/local-files/?d=images/%2e%2e/%2e%2e/secret.png",
        "http://127.0.0.1:9/data/upload/1/../../../x.png",
    ],
)
def test_path_traversal_refused(no_connect, ref):
    with pytest.raises(ImageFetchError) as err:
        ImageFetcher("http://127.0.0.1:9", LEGACY).fetch(ref)
    assert err.value.status == 400 and "traversal" in err.value.message
    assert no_connect == []


def test_other_loopback_port_needs_listing_and_private_networks(ls):
    _, server, other, other_seen = ls
    url = other.url + "/cat.png"
    with pytest.raises(ImageFetchError) as err:  # same IP as Label Studio, different origin, not listed
        fetcher(server.url).fetch(url)
    assert err.value.status == 403 and "ALLOWED_IMAGE_HOSTS" in err.value.message
    listed = (f"127.0.0.1:{other.port}",)
    with pytest.raises(ImageFetchError) as err:  # listed, but loopback needs ALLOW_PRIVATE_NETWORKS
        fetcher(server.url, allowed_hosts=listed).fetch(url)
    assert err.value.status == 403 and "forbidden address" in err.value.message
    assert other_seen == []  # refused before connecting
    img = fetcher(server.url, allowed_hosts=listed, allow_private_networks=True).fetch(url)
    assert img.image.getpixel((0, 0)) == (0, 255, 255)
    assert other_seen == [None]  # Label Studio's token is not sent to other hosts


def test_redirects_to_forbidden_hosts_refused(ls, monkeypatch):
    _, server, other, _ = ls
    f = fetcher(server.url)
    # Label Studio's own redirect to the metadata service: the address check still applies.
    with pytest.raises(ImageFetchError) as err:
        f.fetch(server.url + "/redirect-metadata")
    assert err.value.status == 403
    with pytest.raises(ImageFetchError) as err:
        f.fetch(server.url + "/redirect-file")
    assert err.value.status == 403
    # An allowed other host may not redirect to hosts outside the list, nor to link-local.
    g = fetcher(server.url, allowed_hosts=(f"127.0.0.1:{other.port}",), allow_private_networks=True)
    for path in ("/to-unlisted", "/to-metadata"):
        with pytest.raises(ImageFetchError) as err:
            g.fetch(other.url + path)
        assert err.value.status == 403


def test_dns_answers_are_checked_at_connect_time(ls, no_connect):
    _, server, _, _ = ls
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])  # first check sees public, connect sees loopback

    def rebinding(host, port):
        return next(answers) if host == "images.example" else ["127.0.0.1"]

    f = ImageFetcher(server.url, LEGACY, allowed_hosts=("images.example",), resolver=rebinding)
    with pytest.raises(ImageFetchError) as err:
        f.fetch("http://images.example/cat.png")
    assert err.value.status == 403 and "127.0.0.1" in err.value.message
    assert no_connect == []


def test_mixed_dns_answer_refused(no_connect):
    f = ImageFetcher(
        "http://127.0.0.1:9", LEGACY, allowed_hosts=("images.example",), resolver=lambda h, p: ["93.184.216.34", "10.1.2.3"]
    )
    with pytest.raises(ImageFetchError) as err:
        f.fetch("http://images.example/cat.png")
    assert err.value.status == 403 and "10.1.2.3" in err.value.message
    assert no_connect == []


def test_allowed_public_host_connects_to_checked_address(ls):
    _, server, other, other_seen = ls
    # "images.example" resolves (by the injected resolver) to the other server; the socket must go there
    # although the name does not resolve in real DNS.
    f = ImageFetcher(
        server.url, LEGACY, allowed_hosts=("*.example",), allow_private_networks=True, resolver=lambda h, p: ["127.0.0.1"]
    )
    HOSTS_SEEN.clear()
    img = f.fetch(f"http://images.example:{other.port}/cat.png")
    assert img.image.getpixel((0, 0)) == (0, 255, 255) and other_seen == [None]
    assert HOSTS_SEEN == [f"images.example:{other.port}"]  # virtual hosting still works with a pinned address


def test_redact_hides_secrets():
    assert redact("https://b.s3.amazonaws.com/x.png?X-Amz-Signature=abc") == "https://b.s3.amazonaws.com/x.png"
    assert redact("/data/local-files/?d=a/b.png") == "/data/local-files/?d=a/b.png"
    assert "AAAA" not in redact("data:image/png;base64," + "A" * 100)


# -- decoding: data URIs, EXIF, modes ---------------------------------------------------------------------


def data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_data_uri(no_connect):
    img = ImageFetcher().fetch(data_uri(png_bytes(color=(1, 2, 3))))
    assert img.image.getpixel((5, 5)) == (1, 2, 3) and (img.width, img.height) == (32, 24)
    with pytest.raises(ImageFetchError) as err:
        ImageFetcher().fetch("data:image/png;base64,!!!!")
    assert err.value.status in (400, 415)
    with pytest.raises(ImageFetchError) as err:
        ImageFetcher(max_bytes=1000).fetch(data_uri(b"\x00" * 5000))
    assert err.value.status == 413
    with pytest.raises(ImageFetchError) as err:
        ImageFetcher().fetch(data_uri(b"<html>no</html>", "text/html"))
    assert err.value.status == 415
    assert no_connect == []


def upright() -> Image.Image:
    """40x20 image with a distinct colour per quadrant, so every flip/rotation is distinguishable."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:10, :20] = (255, 0, 0)
    arr[:10, 20:] = (0, 255, 0)
    arr[10:, :20] = (0, 0, 255)
    arr[10:, 20:] = (255, 255, 0)
    return Image.fromarray(arr)


# How a camera stores the upright image for each EXIF orientation (EXIF 2.3, tag 0x0112): the inverse of the
# transform a viewer applies.
STORED = {
    1: lambda im: im,
    2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
    4: lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    5: lambda im: im.transpose(Image.Transpose.TRANSPOSE),
    6: lambda im: im.transpose(Image.Transpose.ROTATE_90),  # viewer rotates 90° clockwise
    7: lambda im: im.transpose(Image.Transpose.TRANSVERSE),
    8: lambda im: im.transpose(Image.Transpose.ROTATE_270),  # viewer rotates 90° counter-clockwise
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(orientation):
    stored = STORED[orientation](upright())
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif.tobytes())
    image, width, height = ImageFetcher().decode(buf.getvalue())
    assert (width, height) == (40, 20)
    assert np.array_equal(np.asarray(image), np.asarray(upright()))


def _roundtrip(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_modes_become_rgb():
    f = ImageFetcher()
    gray, _, _ = f.decode(_roundtrip(Image.new("L", (4, 4), 77)))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black shows as white
    out, _, _ = f.decode(_roundtrip(rgba))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (10, 20, 30)
    la, _, _ = f.decode(_roundtrip(Image.new("LA", (4, 4), (50, 255))))
    assert la.getpixel((2, 2)) == (50, 50, 50)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    out, _, _ = f.decode(_roundtrip(pal))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (12, 34, 56)
    pal.info["transparency"] = 1
    out, _, _ = f.decode(_roundtrip(pal))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    bw, _, _ = f.decode(_roundtrip(Image.new("1", (4, 4), 1)))
    assert bw.getpixel((0, 0)) == (255, 255, 255)
    cmyk, _, _ = f.decode(_roundtrip(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "TIFF"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_gray_is_scaled_not_clipped():
    arr = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    out, width, height = ImageFetcher().decode(_roundtrip(Image.fromarray(arr)))
    assert (width, height) == (4, 1)
    values = [out.getpixel((i, 0))[0] for i in range(4)]
    assert values[0] == 0 and abs(values[1] - 128) <= 1 and values[2] == 255 and values[3] == 4
    assert to_rgb(Image.fromarray(np.full((2, 2), 3.5, np.float32))).getpixel((0, 0)) == (3, 3, 3)


def test_truncated_image_is_422():
    data = _roundtrip(upright().resize((400, 200)), "JPEG")
    with pytest.raises(ImageFetchError) as err:
        ImageFetcher().decode(data[: len(data) // 2])
    assert err.value.status in (415, 422)


# -- TLS with pinned addresses -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for `images.example` (needs `openssl`)."""
    import subprocess

    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=images.example", "-addext", "subjectAltName=DNS:images.example"],
        check=True, capture_output=True,
    )
    seen: list = []
    server = make_server("127.0.0.1", 0, build_other_app(seen), threaded=True, ssl_context=(str(cert), str(key)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port, str(cert)
    server.shutdown()


def test_https_connects_to_checked_address_and_verifies_hostname(tls_server):
    port, cert = tls_server
    kwargs = dict(allow_private_networks=True, resolver=lambda h, p: ["127.0.0.1"], verify=cert)
    f = ImageFetcher("http://127.0.0.1:9", LEGACY, allowed_hosts=("images.example",), **kwargs)
    assert f.fetch(f"https://images.example:{port}/cat.png").image.getpixel((0, 0)) == (0, 255, 255)
    # Same address, another name: the certificate check still uses the URL's host name.
    g = ImageFetcher("http://127.0.0.1:9", LEGACY, allowed_hosts=("other.example",), **kwargs)
    with pytest.raises(ImageFetchError) as err:
        g.fetch(f"https://other.example:{port}/cat.png")
    assert err.value.status == 502
