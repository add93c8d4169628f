"""WSGI entry point: `gunicorn 'backend.wsgi:app'` (settings from the environment, model loads in the background)."""
from clipseg_model.numerics import flush_denormals

flush_denormals()  # before torch starts threads (see clipseg_model.numerics)

from backend.http.app import create_app  # noqa: E402
from backend.logs import setup_logging  # noqa: E402
from backend.settings import Settings  # noqa: E402

_settings = Settings.from_env()
setup_logging(_settings.log_level, _settings.log_json)
app = create_app(_settings)
