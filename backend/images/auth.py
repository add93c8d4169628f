"""Label Studio authentication for image downloads: a legacy key as `Token <key>`; a personal access token (a JWT
refresh token) exchanged at `POST /api/token/refresh/` for a short-lived access token sent as `Bearer`, cached and
renewed before it expires and once more on a 401. Only ever sent to Label Studio's own origin."""
from __future__ import annotations

import base64
import binascii
import json
import logging
import time

import requests

from backend.images.errors import ImageFetchError, redact

logger = logging.getLogger(__name__)

_TOKEN_REFRESH_MARGIN_S = 30.0  # renew the access token this long before its `exp`
_ACCESS_TOKEN_FALLBACK_TTL_S = 240.0  # Label Studio access tokens live 5 min; used when `exp` is unreadable


def is_jwt(token: str) -> bool:
    """True when `token` has a JWT's shape: three base64url parts whose first decodes to a JSON header."""
    return _jwt_part(token, 0) is not None


def _jwt_part(token: str, index: int) -> dict | None:
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    try:
        raw = base64.urlsafe_b64decode(parts[index] + "=" * (-len(parts[index]) % 4))
        out = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    return out if isinstance(out, dict) else None




class LabelStudioAuthMixin:
    """The fetcher's Authorization header (its `api_key`, `_token_lock`, `_access_token`, `_access_expires`, and the
    guarded session it posts the refresh through)."""


    def _uses_jwt(self) -> bool:
        return is_jwt(self.api_key)

    def _invalidate_access_token(self) -> None:
        with self._token_lock:
            self._access_token, self._access_expires = None, 0.0

    def _auth_header(self, deadline: float) -> str | None:
        key = self.api_key
        if not key:
            return None
        if not is_jwt(key):
            return f"Token {key}"
        claims = _jwt_part(key, 1) or {}
        if claims.get("token_type") not in (None, "refresh"):
            return f"Bearer {key}"  # already an access token: use it as is
        with self._token_lock:
            if self._access_token is None or time.time() > self._access_expires - _TOKEN_REFRESH_MARGIN_S:
                self._access_token = self._refresh(key, deadline)
                exp = (_jwt_part(self._access_token, 1) or {}).get("exp")
                self._access_expires = float(exp) if isinstance(exp, (int, float)) else time.time() + _ACCESS_TOKEN_FALLBACK_TTL_S
            return f"Bearer {self._access_token}"

    def _refresh(self, refresh_token: str, deadline: float) -> str:
        """Exchange a personal access token for an access token at Label Studio's /api/token/refresh/."""
        url = f"{self._require_base_url('/api/token/refresh/')}/api/token/refresh/"
        remaining = max(0.1, deadline - time.monotonic())
        self._run_guard(self._check_addresses, url)
        self._local.guard = self._guard_for(url)
        try:
            response = self._run_guard(
                self._session().post,
                url,
                json={"refresh": refresh_token},
                timeout=(remaining, remaining),
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise ImageFetchError(f"token refresh failed: {type(exc).__name__}", 502) from exc
        finally:
            self._local.guard = None
        if response.status_code != 200:
            raise ImageFetchError(
                f"token refresh at {redact(url)} answered HTTP {response.status_code}: is LABEL_STUDIO_API_KEY a "
                "valid, unexpired personal access token?",
                401,
            )
        try:
            access = response.json().get("access")
        except ValueError:
            access = None
        if not isinstance(access, str) or not access:
            raise ImageFetchError("token refresh answer has no access token", 502)
        logger.info("refreshed the Label Studio access token")  # never the token itself
        return access

    # -- decoding ----------------------------------------------------------------------------------------
