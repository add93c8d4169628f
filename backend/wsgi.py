"""WSGI entry point: `gunicorn 'backend.wsgi:app'` (settings from the environment, model loads in the background)."""
from backend.app import create_app
from backend.logs import setup_logging
from backend.settings import Settings

_settings = Settings.from_env()
setup_logging(_settings.log_level, _settings.log_json)
app = create_app(_settings)
