"""The image fetcher: task image reference → bytes (Label Studio's origin, presigned cloud URIs, allowed hosts,
data: URIs) under the SSRF rules of the package docstring, cached in memory, decoded to RGB."""
from __future__ import annotations

import base64
import ipaddress
import logging
import threading
import time
from typing import Callable, Iterable
from urllib.parse import parse_qs, quote, unquote, urljoin, urlsplit

import requests

from backend.labelstudio.image_refs import reference_kind
from backend.settings import MB, Settings
from clipseg_model.caches import LRUCache

from backend.images.auth import LabelStudioAuthMixin
from backend.images.decode import ImageDecoderMixin
from backend.images.errors import FetchedImage, ImageFetchError, redact
from backend.images.transport import Resolver, _ForbiddenAddress, _GuardedAdapter, _origin, _split_host_pattern, default_resolver

logger = logging.getLogger(__name__)

_REDIRECTS = {301, 302, 303, 307, 308}


class ImageFetcher(LabelStudioAuthMixin, ImageDecoderMixin):
    """Fetches task images with Label Studio auth, SSRF checks, limits and a bounded byte cache.

    Thread-safe: one instance serves all requests of a process.
    """

    def __init__(
        self,
        base_url: str = "",
        api_key: str = "",
        *,
        allowed_hosts: Iterable[str] = (),
        allow_private_networks: bool = False,
        timeout: float = 10.0,
        max_bytes: int = 64 * 1024 * 1024,
        max_image_pixels: int = 50_000_000,
        cache_bytes: int = 256 * 1024 * 1024,
        max_redirects: int = 5,
        resolver: Resolver = default_resolver,
        verify: bool | str = True,
    ):
        """
        Args:
            base_url: Label Studio's URL (`http://host:8080`); empty: `use_setup_credentials` provides it.
            api_key: legacy token or personal access token; empty: /setup's `access_token`.
            allowed_hosts: other hosts images may come from: `host`, `host:port`, `*.domain` or `*` (any host
                that passes the address check).
            allow_private_networks: allow loopback/private addresses for hosts other than Label Studio's.
            timeout: seconds for one whole fetch (connect, redirects and body).
            max_bytes: larger downloads are refused (413) without reading past the cap.
            max_image_pixels: width*height above this is refused (413) before decoding.
            cache_bytes: byte budget of the download cache (0 disables it).
            resolver: host, port → addresses; injectable so tests can simulate DNS answers.
            verify: TLS verification: True, False, or a CA bundle path (self-signed Label Studio).
        """
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._setup_url = ""
        self._setup_key = ""
        self.allowed_hosts = tuple(h.strip().lower() for h in allowed_hosts if h.strip())
        self.allow_private_networks = allow_private_networks
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_image_pixels = max_image_pixels
        self.max_redirects = max_redirects
        self._resolver = resolver
        self._verify = verify
        self._cache: LRUCache[bytes] = LRUCache(cache_bytes, len)
        self._token_lock = threading.Lock()
        self._access_token: str | None = None
        self._access_expires = 0.0
        self._local = threading.local()  # one requests.Session per thread: Session is not thread-safe

    @classmethod
    def from_settings(cls, settings: Settings, hostname: str = "", access_token: str = "", **kwargs) -> "ImageFetcher":
        """Build from `Settings`; `hostname`/`access_token` (from /setup) fill in only what settings leave empty."""
        fetcher = cls(
            settings.label_studio_url,
            settings.label_studio_api_key,
            allowed_hosts=settings.allowed_hosts,
            allow_private_networks=settings.allow_private_networks,
            timeout=settings.image_timeout,
            max_image_pixels=settings.max_image_pixels,
            **{"cache_bytes": settings.image_cache_mb * MB} | kwargs,  # an explicit cache_bytes wins
        )
        fetcher.use_setup_credentials(hostname, access_token)
        return fetcher

    def use_setup_credentials(self, hostname: str = "", access_token: str = "") -> None:
        """Remember /setup's `hostname` and `access_token`; explicit constructor values still win."""
        hostname = (hostname or "").rstrip("/")
        with self._token_lock:
            if hostname:
                self._setup_url = hostname
            if access_token and access_token != self._setup_key:
                self._setup_key = access_token
                if not self._api_key:
                    self._access_token, self._access_expires = None, 0.0

    @property
    def base_url(self) -> str:
        return self._base_url or self._setup_url

    @property
    def api_key(self) -> str:
        return self._api_key or self._setup_key

    @property
    def cache_size_bytes(self) -> int:
        return self._cache.total_cost

    # -- public API --------------------------------------------------------------------------------------

    def fetch(self, ref: str, task_id: int | str | None = None) -> FetchedImage:
        """Fetch and decode one image reference.

        Args:
            ref: the task's image value (`/data/upload/...`, `s3://...`, `https://...`, `data:...`).
            task_id: the task's id; needed for cloud storage URIs (presign endpoint).
        Returns:
            FetchedImage with an RGB, EXIF-transposed image.
        Raises:
            ImageFetchError: any failure, with an HTTP-like status.
        """
        data = self.fetch_bytes(ref, task_id)
        return FetchedImage(*self.decode(data), source=redact(ref.strip()))

    def fetch_bytes(self, ref: str, task_id: int | str | None = None) -> bytes:
        """The raw bytes behind `ref` (cached by resolved URL; data: URIs decoded in memory)."""
        if not isinstance(ref, str) or not ref.strip():
            raise ImageFetchError("empty image reference", 400)
        ref = ref.strip()
        if ref[:5].lower() == "data:":
            return self._decode_data_uri(ref)
        url, cache_key = self.resolve(ref, task_id)
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        started = time.monotonic()
        data = self._download(url, deadline=started + self.timeout)
        # Cache only what decodes: a half-broken upstream should get another chance next time.
        self._check_header(data)
        self._cache.put(cache_key, data)
        logger.debug("fetched %s: %d bytes in %.3f s", redact(url), len(data), time.monotonic() - started)
        return data

    def resolve(self, ref: str, task_id: int | str | None = None) -> tuple[str, str]:
        """(absolute URL to download, cache key) for a non-data reference; raises ImageFetchError(400/403)."""
        kind = reference_kind(ref)
        if kind == "cloud":
            if task_id is None or str(task_id).strip() == "":
                raise ImageFetchError(f"cloud storage URI {redact(ref)} needs the task id for presigning", 400)
            if not str(task_id).isdigit():
                raise ImageFetchError(f"bad task id {task_id!r}", 400)
            base = self._require_base_url(ref)
            fileuri = base64.urlsafe_b64encode(ref.encode()).decode()
            # Keyed by the cloud URI: the presigned URL changes per call, the object does not.
            return f"{base}/tasks/{task_id}/presign/?fileuri={fileuri}", ref
        if kind == "http":
            self._check_path(urlsplit(ref).path, ref)
            return ref, ref
        scheme = urlsplit(ref).scheme.lower()
        if scheme:
            raise ImageFetchError(f"unsupported URL scheme {scheme!r} in {redact(ref)}", 403 if scheme == "file" else 400)
        if kind != "label_studio":
            raise ImageFetchError(f"{redact(ref)} is not a Label Studio media path (/data/... or /storage-data/...)", 400)
        # A Label Studio-relative path. `upload/...` is how older exports store uploads.
        path = ref if ref.startswith("/") else "/" + ref
        if path.startswith("/upload/"):
            path = "/data" + path
        self._check_path(urlsplit(path).path, ref)
        local = parse_qs(urlsplit(path).query).get("d")
        if local is not None:
            self._check_path(local[-1], ref)
        url = self._require_base_url(ref) + path
        return url, url

    # -- resolution and policy ---------------------------------------------------------------------------

    def _require_base_url(self, ref: str) -> str:
        base = self.base_url
        if not base:
            raise ImageFetchError(
                f"cannot resolve {redact(ref)}: Label Studio's URL is unknown (set LABEL_STUDIO_URL or call /setup)", 400
            )
        if _origin(base) is None:
            raise ImageFetchError(f"Label Studio URL {base!r} must start with http:// or https://", 400)
        return base

    @staticmethod
    def _check_path(path: str, ref: str) -> None:
        # Check the decoded path too: `%2e%2e` is `..` once the server unquotes it.
        for candidate in (path, unquote(path), unquote(unquote(path))):
            segments = candidate.replace("\\", "/").split("/")
            if ".." in segments or "\x00" in candidate:
                raise ImageFetchError(f"path traversal refused in {redact(ref)}", 400)

    def _is_ls_origin(self, url: str) -> bool:
        base = self.base_url
        return bool(base) and _origin(url) is not None and _origin(url) == _origin(base)

    def _host_allowed(self, url: str) -> bool:
        origin = _origin(url)
        if origin is None:
            return False
        if self._is_ls_origin(url):
            return True
        _, host, port = origin
        for pattern in self.allowed_hosts:
            if pattern == "*":
                return True
            name, want_port = _split_host_pattern(pattern)
            if want_port and want_port != str(port):
                continue
            if name == host or (name.startswith("*.") and host.endswith(name[1:])):
                return True
        return False

    def _address_allowed(self, address: str, ls_origin: bool) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ls_origin:
            return True  # Label Studio often runs on localhost or a private network: trust its configured URL
        if ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            return False  # cloud metadata (169.254.169.254) and friends: never, even with private networks on
        if ip.is_global:
            return True
        return self.allow_private_networks

    def _check_addresses(self, url: str) -> None:
        """Resolve the URL's host and refuse (403) when any address is forbidden. No connection is made."""
        _, host, port = _origin(url)  # type: ignore[misc]
        self._guard_for(url)(host, port)

    def _guard_for(self, url: str) -> Callable[[str, int], list[str]]:
        ls_origin = self._is_ls_origin(url)

        def guard(host: str, port: int) -> list[str]:
            try:
                addresses = self._resolver(host, port)
            except (OSError, UnicodeError) as exc:
                raise ImageFetchError(f"cannot resolve host {host}: {exc}", 502) from exc
            if not addresses:
                raise ImageFetchError(f"host {host} has no address", 502)
            # Every address must pass: a mixed answer is how rebinding attacks start.
            bad = [a for a in addresses if not self._address_allowed(a, ls_origin)]
            if bad:
                raise _ForbiddenAddress(
                    f"{host} resolves to a forbidden address ({', '.join(bad)}): private, loopback and link-local "
                    "networks are refused (ALLOW_PRIVATE_NETWORKS allows private ones)"
                )
            return addresses

        return guard

    # -- HTTP --------------------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxies or netrc from the environment: a proxy would bypass the checks
            session.verify = self._verify
            adapter = _GuardedAdapter(self._connect_guard)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    def _connect_guard(self, host: str, port: int) -> list[str]:
        # Called at connect time for whatever URL the session is fetching; the URL's policy was chosen when
        # the request was made (see _request), stored per thread.
        guard = getattr(self._local, "guard", None)
        if guard is None:
            raise _ForbiddenAddress("connection made outside ImageFetcher._request")
        return guard(host, port)

    def _download(self, url: str, deadline: float) -> bytes:
        """GET with redirects followed by hand: every hop is re-checked against the host and address rules."""
        hops = 0
        retried_auth = False
        trusted_redirect = False  # Label Studio's redirect (presign → bucket) may leave allowed_hosts
        while True:
            if not (self._host_allowed(url) or (trusted_redirect and _origin(url) is not None)):
                if _origin(url) is None:
                    raise ImageFetchError(f"refused URL {redact(url)}: only http(s) is fetched", 403)
                raise ImageFetchError(
                    f"host of {redact(url)} is not Label Studio's and not in ALLOWED_IMAGE_HOSTS", 403
                )
            self._check_path(urlsplit(url).path, url)
            ls = self._is_ls_origin(url)
            response = self._request(url, deadline, auth=ls)
            try:
                if response.status_code == 401 and ls and not retried_auth and self._uses_jwt():
                    # The access token may have been revoked or expired early: refresh once and retry.
                    retried_auth = True
                    self._invalidate_access_token()
                    continue
                if response.status_code in _REDIRECTS:
                    hops += 1
                    if hops > self.max_redirects:
                        raise ImageFetchError(f"too many redirects fetching {redact(url)}", 502)
                    location = response.headers.get("Location", "")
                    if not location:
                        raise ImageFetchError(f"redirect without Location from {redact(url)}", 502)
                    trusted_redirect = ls
                    url = urljoin(url, location)
                    continue
                if response.status_code == 404 and ls and urlsplit(url).path.startswith("/data/upload/"):
                    # Label Studio with cloud-backed default storage serves uploads only through its proxy.
                    path = unquote(urlsplit(url).path[len("/data/"):])
                    url = f"{self.base_url}/storage-data/uploaded/?filepath={quote(path, safe='/')}"
                    continue
                self._raise_for_status(response, url)
                return self._read_body(response, url, deadline)
            finally:
                response.close()

    def _request(self, url: str, deadline: float, auth: bool) -> requests.Response:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ImageFetchError(f"timed out fetching {redact(url)}", 504)
        headers = {"Accept": "image/*,*/*;q=0.5", "User-Agent": "clipseg-ls-backend"}
        if auth:
            header = self._auth_header(deadline)
            if header:
                headers["Authorization"] = header
        # Refuse before any connection is attempted, with a clear message; the connect-time guard repeats
        # the check on the addresses actually used.
        self._run_guard(self._check_addresses, url)
        self._local.guard = self._guard_for(url)
        try:
            return self._run_guard(
                self._session().get,
                url,
                headers=headers,
                timeout=(min(remaining, self.timeout), min(remaining, self.timeout)),
                allow_redirects=False,
                stream=True,
            )
        except requests.Timeout as exc:
            raise ImageFetchError(f"timed out fetching {redact(url)}", 504) from exc
        except requests.RequestException as exc:
            raise ImageFetchError(f"cannot fetch {redact(url)}: {type(exc).__name__}", 502) from exc
        finally:
            self._local.guard = None

    @staticmethod
    def _run_guard(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _ForbiddenAddress as exc:
            raise ImageFetchError(f"refused: {exc}", 403) from None

    @staticmethod
    def _raise_for_status(response: requests.Response, url: str) -> None:
        code = response.status_code
        if 200 <= code < 300:
            return
        hint = ""
        if code == 401:
            hint = (
                ": Label Studio refused the token (a JWT-only organisation needs a personal access token in "
                "LABEL_STUDIO_API_KEY)"
            )
        status = code if code in (400, 401, 403, 404, 410, 413, 415) else 502
        raise ImageFetchError(f"HTTP {code} from {redact(url)}{hint}", status)

    def _read_body(self, response: requests.Response, url: str, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageFetchError(f"{redact(url)} is {declared} bytes, over the {self.max_bytes}-byte limit", 413)
        ctype = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype in ("text/html", "application/json", "text/plain"):
            # Typical of a login page or an error JSON answered with 200; the bytes would not decode anyway.
            raise ImageFetchError(f"{redact(url)} returned {ctype}, not an image", 415)
        chunks, total = [], 0
        try:
            for chunk in response.iter_content(64 * 1024):
                total += len(chunk)
                if total > self.max_bytes:
                    raise ImageFetchError(f"{redact(url)} is over the {self.max_bytes}-byte limit", 413)
                if time.monotonic() > deadline:
                    # A server trickling bytes stays under the read timeout forever; the deadline stops it.
                    raise ImageFetchError(f"timed out reading {redact(url)}", 504)
                chunks.append(chunk)
        except requests.RequestException as exc:
            # requests reports a read timeout inside iter_content as a ConnectionError.
            if isinstance(exc, requests.Timeout) or "timed out" in str(exc).lower():
                raise ImageFetchError(f"timed out reading {redact(url)}", 504) from exc
            raise ImageFetchError(f"connection broke while reading {redact(url)}", 502) from exc
        return b"".join(chunks)

