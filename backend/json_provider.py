"""Flask JSON through orjson: a /predict answer with brush RLE is a few hundred thousand small integers per
region, which the standard library's encoder writes 5-10x slower (measured in `clipseg bench`, row d)."""
from __future__ import annotations

from typing import Any

import orjson
from flask.json.provider import JSONProvider

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def dumps_bytes(obj: Any) -> bytes:
    """`obj` → UTF-8 JSON bytes (numpy arrays and scalars allowed; NaN/inf become null)."""
    return orjson.dumps(obj, option=_OPTIONS)


def loads(data: str | bytes | bytearray | memoryview) -> Any:
    """JSON text → Python objects; malformed input raises ValueError (orjson.JSONDecodeError subclasses it)."""
    return orjson.loads(data)


class OrjsonProvider(JSONProvider):
    """`app.json` for Flask: `jsonify` and `request.get_json` go through orjson."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return dumps_bytes(obj).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads(s)

    def response(self, *args: Any, **kwargs: Any):
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(dumps_bytes(obj), mimetype="application/json")
