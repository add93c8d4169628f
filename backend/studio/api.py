"""Label Studio's REST API through the SDK's HTTP client (its auth: a legacy token, or a personal access token
refreshed into access tokens; its retries), with bodies serialised by orjson.

Only public SDK names (label-studio-sdk 2.1.2): `LabelStudio(httpx_client=...)` and `core.SyncClientWrapper`, whose
`httpx_client` is the SDK's `core.HttpClient` — the same class, headers, auth and retries its own methods use, built
here on the same connection pool rather than reached through the client's private `_client_wrapper`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

API_TIMEOUT_S = 60.0

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio


def open_client(url: str, key: str, timeout: float = API_TIMEOUT_S) -> "LabelStudio":
    """An SDK client for Label Studio at `url` with `key`, and its raw JSON client as `.http` (`api_json`); nothing
    is requested yet."""
    import httpx
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core import SyncClientWrapper

    base = url.rstrip("/")
    pool = httpx.Client(timeout=timeout, follow_redirects=True)  # what LabelStudio builds when given none
    client = LabelStudio(base_url=base, api_key=key, timeout=timeout, httpx_client=pool)
    client.http = SyncClientWrapper(api_key=key, base_url=base, timeout=timeout, httpx_client=pool).httpx_client
    return client


def api_json(client, method: str, path: str, body: Any = None, params: Mapping[str, Any] | None = None) -> Any:
    """`method` `path` (relative, e.g. "api/projects/3") with `body` as JSON; the decoded answer (None when empty).
    Raises label_studio_sdk's ApiError on a non-2xx answer.

    The SDK's own methods run its generic JSON encoder over every integer of a brush RLE (~7 us each, holding the
    GIL: seconds for big noisy masks) and parse answers into Enterprise models; this keeps only its HTTP client.
    `client` comes from `open_client`."""
    import orjson
    from label_studio_sdk.core.api_error import ApiError

    kwargs: dict[str, Any] = {"method": method, "params": dict(params or {})}
    if body is not None:
        kwargs |= {"content": orjson.dumps(body), "headers": {"content-type": "application/json"}}
    response = client.http.request(path, **kwargs)
    if not 200 <= response.status_code < 300:
        raise ApiError(status_code=response.status_code, headers=dict(response.headers), body=response.text[:500])
    return orjson.loads(response.content) if response.content else None


def api_error_text(exc: Exception) -> str:
    """A short reason for logs: "HTTP 400: <body>" for the SDK's ApiError (whose str starts with all headers)."""
    status = getattr(exc, "status_code", None)
    if status is not None:
        return f"HTTP {status}: {str(getattr(exc, 'body', ''))[:300]}"
    return f"{type(exc).__name__}: {str(exc)[:300]}"
