"""Task image reference → RGB `PIL.Image`, safely.

References Label Studio puts in task data, and how each is fetched:
- `/data/upload/<project>/<file>` (also `upload/...`), `/data/local-files/?d=<path>`, `/storage-data/uploaded/?filepath=`
  → Label Studio's base URL + path, with its Authorization header;
- `s3://`, `gs://`, `azure-blob://` → `<base>/tasks/<task_id>/presign/?fileuri=<urlsafe-b64(uri)>` (the path
  label-studio-sdk's `get_local_path` builds), which redirects to a signed URL or proxies the bytes;
- `http(s)://...` → directly, only from Label Studio's host or `allowed_hosts`;
- `data:image/...;base64,...` → decoded in memory.

Authentication (only ever sent to Label Studio's own origin): a legacy key goes as `Token <key>`; a JWT-shaped
key with `token_type` "refresh" (a personal access token) is exchanged at `POST /api/token/refresh/` for a
short-lived access token sent as `Bearer`, cached and renewed before it expires and once more on a 401.

SSRF rules: no `file:`; only Label Studio's origin, `allowed_hosts`, or hosts Label Studio itself redirects to;
every resolved address is checked (loopback/private need `allow_private_networks` unless it is Label Studio's
own origin; link-local such as 169.254.169.254 only for Label Studio's own origin); the socket connects to the
address that was checked, so DNS rebinding cannot swap it; redirects are followed by hand and re-checked.
"""
from backend.images.auth import is_jwt
from backend.images.errors import FetchedImage, ImageFetchError, redact
from backend.images.fetcher import ImageFetcher
from backend.images.transport import default_resolver

__all__ = ["FetchedImage", "ImageFetchError", "ImageFetcher", "default_resolver", "is_jwt", "redact"]
