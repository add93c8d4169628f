"""HTTP routes of the ML backend (the wire protocol of label-studio-ml-backend 2.x): /health, /setup, /predict,
/webhook, /metrics, as module-level views of one blueprint. Routes only parse, delegate to the app's
`BackendRuntime` (`app.extensions["clipseg_runtime"]`) and format; no model code here."""
from __future__ import annotations

import base64
import hmac
import logging
import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend.intake.inbox import SpoolUnavailable
from backend.http.health import health_report
from backend.studio.model_version import AFTER_PREDICT_S, IN_SYNC
from backend.http.json_provider import OrjsonProvider, loads as json_loads
from backend.labelstudio.config import UnsupportedConfigError
from backend.metrics import CONTENT_TYPE, spool_gauges
from backend.labelstudio.protocol import BadRequest, parse_predict_request, project_id
from backend.serving.budget import PredictBudget
from backend.runtime import BackendRuntime
from backend.serving.model import ModelNotReady
from backend.settings import Settings
from backend.intake.errors import TRANSIENT, classify, describe
from backend.http.webhook_limits import EventTooLarge, check_body_size, check_correction_size

log = logging.getLogger(__name__)

SETUP_WAIT = 1.5  # /setup must answer within Label Studio's 3 s, on a busy 2-core machine too
PREDICT_WAIT = 60.0  # Label Studio waits 100 s for /predict; a failed load answers 503 at once


def _error(message: str, status: int) -> tuple[Response, int]:
    return jsonify({"status": "error", "error": message}), status


def _json_body(raw: bytes | None = None) -> Any:
    raw = request.get_data(cache=False) if raw is None else raw
    try:
        return json_loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


def _runtime() -> BackendRuntime:
    return current_app.extensions["clipseg_runtime"]


def _budget() -> PredictBudget:
    return current_app.extensions["clipseg_predict_budget"]


routes = Blueprint("clipseg", __name__)


# ---- every request ---------------------------------------------------------------------------------------------
@routes.before_app_request
def _auth_and_reload():
    runtime = _runtime()
    auth_user, auth_pass = runtime.settings.basic_auth_user.encode(), runtime.settings.basic_auth_pass.encode()
    if auth_user and request.path != "/health":
        header = request.headers.get("Authorization", "")
        ok = False
        if header.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).partition(b":")
                # compare both, always, in constant time
                ok = hmac.compare_digest(user, auth_user) & hmac.compare_digest(password, auth_pass)
            except (ValueError, TypeError):
                ok = False
        if not ok:
            resp, status = _error("authentication required", 401)
            resp.headers["WWW-Authenticate"] = 'Basic realm="clipseg"'
            return resp, status
    if request.path in ("/predict", "/setup"):
        runtime.model.check_for_update()  # a promoted version starts loading between requests
    return None


@routes.after_app_request
def _count(response: Response) -> Response:
    _runtime().metrics.requests.labels(request.path if request.url_rule else "other", str(response.status_code)).inc()
    return response


# ---- errors ----------------------------------------------------------------------------------------------------
@routes.app_errorhandler(BadRequest)
def _bad_request(exc: BadRequest):
    _runtime().metrics.errors.labels("bad_request").inc()
    return _error(str(exc), 400)


@routes.app_errorhandler(RequestEntityTooLarge)
def _too_large(exc):
    return _error(f"request body larger than {_runtime().settings.max_request_bytes} bytes", 413)


@routes.app_errorhandler(HTTPException)
def _http(exc: HTTPException):
    return _error(exc.description or exc.name, exc.code or 500)


@routes.app_errorhandler(SpoolUnavailable)
def _spool_down(exc: SpoolUnavailable):
    _runtime().metrics.errors.labels("spool_write").inc()
    return _error(f"event not accepted, retry: {exc}", 503)


@routes.app_errorhandler(Exception)
def _unexpected(exc: Exception):
    runtime = _runtime()
    if classify(exc) == TRANSIENT:  # an outage (Redis down, out of disk): say so, it is not our bug
        log.warning("%s unavailable: %s", request.path, describe(exc))
        runtime.metrics.errors.labels("unavailable").inc()
        return _error(f"temporarily unavailable: {describe(exc)}", 503)
    log.exception("unhandled error on %s", request.path)
    runtime.metrics.errors.labels("internal").inc()
    return _error(f"internal error: {type(exc).__name__}", 500)


# ---- the protocol ----------------------------------------------------------------------------------------------
@routes.get("/health")
@routes.get("/")
def health():
    runtime = _runtime()
    model = runtime.model
    report = health_report(runtime)
    return jsonify({
        "status": "DEGRADED" if report["degraded"] else "UP",
        **report,
        "model_class": "ClipSegBackend",
        "model": runtime.settings.model,
        "model_version": model.version,
        "ready": model.ready,
        "loading": model.loading,
        "error": model.problem(),
        **model.status(),  # per project: the version served, fallbacks from broken versions
    })


@routes.post("/setup")
def setup():
    runtime = _runtime()
    body = _json_body()
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    schema = body.get("schema") or body.get("label_config")
    if not isinstance(schema, str) or not schema.strip():
        raise BadRequest("'schema' (the labeling config) is required")
    project = project_id(body.get("project"))
    try:
        runtime.setup(schema, project, str(body.get("hostname") or ""), str(body.get("access_token") or ""))
    except UnsupportedConfigError as exc:
        return _error(str(exc), 400)
    # Label Studio gives /setup 3 s in all: a refusal it can read (503 with a message) beats a read timeout.
    if not runtime.model.wait_ready(SETUP_WAIT):
        return _error(runtime.model.error or "the model is still loading; retry in a few seconds", 503)
    version = runtime.project_model(project, refresh=True).version  # this project's own version
    runtime.metrics.set_model(runtime.settings.model, runtime.model.version)
    return jsonify({"model_version": version})


@routes.post("/predict")
def predict():
    runtime, budget = _runtime(), _budget()
    started = time.perf_counter()
    body = _json_body()
    tasks, schema, context = parse_predict_request(body)
    project = project_id(body.get("project"))
    try:
        config = runtime.config_for_predict(schema, project)
    except UnsupportedConfigError as exc:
        return _error(str(exc), 400)
    if not runtime.model.wait_ready(PREDICT_WAIT):
        return _error(runtime.model.error or "the model is still loading", 503)
    try:
        segmenter = runtime.project_model(project)
    except ModelNotReady as exc:
        return _error(str(exc), 503)
    if not budget.fits(len(tasks)) and runtime.settings.redis_url and project:
        return _over_budget(runtime, budget, tasks, project, segmenter.version)
    answers = runtime.predict_service.answer(segmenter, config, runtime.prompts, tasks, context, project)
    version = segmenter.version
    budget.observe(len(tasks), time.perf_counter() - started)
    runtime.metrics.predict_latency.observe(time.perf_counter() - started)
    if runtime.version_sync is not None and any(a.result for a in answers):
        runtime.version_sync.request(project, AFTER_PREDICT_S, unless=IN_SYNC)
    log.info("predicted %d tasks (%d regions) with %s in %.2f s", len(tasks),
             sum(len(a.result) for a in answers), version, time.perf_counter() - started)
    return jsonify({"results": [a.to_json(version) for a in answers], "model_version": version})


def _over_budget(runtime: BackendRuntime, budget: PredictBudget, tasks: list, project: str, version: str | None):
    """Too many tasks to answer before Label Studio gives up: queue them as a pre-label run and say so at once."""
    from backend.prelabel import queue_prelabel
    from finetune.triggers import PRELABEL_QUEUE

    settings = runtime.settings
    ids = [t["id"] for t in tasks if isinstance(t.get("id"), int)]
    run_id, created = queue_prelabel(runtime.redis, runtime.prelabel_spec(project), task_ids=ids,
                                     reason="/predict over budget")
    message = (f"{len(tasks)} tasks would take about {budget.estimate(len(tasks)):.0f} s, more than this backend's "
               f"/predict budget of {settings.predict_budget:.0f} s (PREDICT_BUDGET; Label Studio waits 100 s): "
               f"{'queued' if created else 'already running as'} pre-label run {run_id} on the "
               f"'{PRELABEL_QUEUE}' queue. Predictions appear in Label Studio as `clipseg worker`s finish chunks; "
               f"watch with `clipseg prelabel --status {run_id}` or `clipseg jobs`.")
    log.warning("%s", message)
    if created:  # Label Studio shows none of this body: say it in the ML backend's title too
        runtime.announce_prelabel(project, len(ids), segmenter_version=version)
    runtime.metrics.errors.labels("over_budget").inc()
    return jsonify({"status": "error", "error": message, "job_id": run_id, "tasks": len(ids),
                    "queue": PRELABEL_QUEUE}), 503


@routes.post("/webhook")
def webhook():
    runtime = _runtime()
    settings = runtime.settings
    try:
        check_body_size(request.content_length)
    except EventTooLarge as exc:
        runtime.metrics.webhooks.labels("unknown", "too_large").inc()
        return _error(str(exc), exc.status)
    raw = request.get_data(cache=False)
    body = _json_body(raw)
    if not isinstance(body, dict) or not isinstance(body.get("action"), str):
        raise BadRequest("a webhook body is a JSON object with an 'action'")
    action = body["action"]
    if action == "START_TRAINING":
        project = project_id((body.get("project") or {}).get("id") if isinstance(body.get("project"), dict) else body.get("project"))
        if not project:
            raise BadRequest("START_TRAINING needs a project")
        if not settings.redis_url:
            return _error("fine-tuning needs Redis (REDIS_URL)", 503)
        result = runtime.trigger(project, "start_training")
        runtime.metrics.webhooks.labels(action, result.detail).inc()
        return jsonify({"status": result.detail, "job_id": result.job_id}), 201 if result.enqueued else 200
    if runtime.inbox is None:
        runtime.metrics.webhooks.labels(action, "no_redis").inc()
        log.info("webhook %s received; no REDIS_URL, so corrections are not kept", action)
        return jsonify({"status": "ignored", "reason": "no corrections store configured"}), 200
    try:  # refused here, with a 4xx Label Studio shows, rather than acknowledged and then choked on
        check_correction_size(body, settings.max_image_pixels)
    except EventTooLarge as exc:
        runtime.metrics.webhooks.labels(action, "too_large").inc()
        return _error(str(exc), exc.status)
    outcome = runtime.inbox.submit(body, raw)
    runtime.metrics.webhooks.labels(action, outcome).inc()
    return jsonify({"status": outcome}), 201 if outcome == "accepted" else 200


@routes.get("/metrics")
def metrics():
    return Response(_runtime().metrics.render(), mimetype=CONTENT_TYPE.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE})


def create_app(settings: Settings | None = None, runtime: BackendRuntime | None = None, start: bool = True) -> Flask:
    """The Flask app: the routes above over a `BackendRuntime` built from `settings` (and started, with `start`)
    unless one is given."""
    settings = settings or (runtime.settings if runtime is not None else Settings.from_env())
    runtime = runtime or BackendRuntime(settings)
    if start:
        runtime.start()
    app = Flask("clipseg-backend")
    app.json = OrjsonProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["clipseg_runtime"] = runtime
    app.extensions["clipseg_predict_budget"] = PredictBudget(settings.predict_budget)
    runtime.metrics.add_collector(lambda: spool_gauges(runtime.inbox))
    app.register_blueprint(routes)
    return app
