"""A pre-label run, told where an annotator looks: the title of the project's ML backend in Label Studio.

Label Studio 1.23 neither shows nor logs the body of a 503 from /predict: "Retrieve predictions" on a big selection
reports "Retrieved N predictions" and nothing else. Its only free-text field a backend can change without turning
its state to Error is the ML backend's title, shown on the model card (Settings > Model) and wherever the backend is
listed. So the title reads "clipseg · pre-labelling 120 of 300 tasks …" while a run goes, then "clipseg · 300 tasks
pre-labelled at 08:14 UTC …" or "clipseg · pre-label run failed: …". The part before " · " is the user's own title.

Which backend is ours: the project's only one, else those whose `model_version` (what our /setup answered) is one
of `our_versions`. Updates are throttled (MIN_INTERVAL_S) except the last one of a run; each PATCH makes Label Studio
call /setup again, which is cheap.

A notice can be lost: Label Studio checks a backend (`MLBackend.update_state`: /health, /setup, then `save()` of the
whole row) on every listing of a project's backends, e.g. each load of the model page or the data manager. A check
that read the row before our PATCH and saves after it writes the old title back (seen in the browser tests: the
queued notice gone 0.2 s after it was written, while the model page loaded). So a notice that nothing will follow
(`keep`: queued, done, failed) is read back after KEEP_AFTER_S and written again if the title is the one from
before it again (a newer title, another notice or the user's, is left alone).
"""
from __future__ import annotations

import logging
import time
from typing import Iterable

log = logging.getLogger(__name__)

SEPARATOR = " · "
MIN_INTERVAL_S = 5.0
MAX_TITLE = 240  # Label Studio's column is 255 characters
KEEP_AFTER_S = 2.0  # a check of the backend (two requests to this server) takes well under this
KEEP_TRIES = 3


def base_title(title: str | None) -> str:
    """The user's title without our notice."""
    return (title or "").split(SEPARATOR, 1)[0].strip() or "clipseg"


def titled(title: str | None, notice: str) -> str:
    return f"{base_title(title)}{SEPARATOR}{notice}"[:MAX_TITLE]


class RunNotice:
    """Writes notices about one project's pre-label run into its ML backend's title (best effort: a failure is
    logged once and never stops the run)."""

    def __init__(self, client, project: str, our_versions: Iterable[str] = ()):
        self.client, self.project = client, str(project)
        self.our_versions = set(our_versions)
        self._backends: list[dict] | None = None
        self._last = 0.0
        self._last_text = ""
        self._failed = False

    @classmethod
    def for_project(cls, client, project: str, registry, *also: str | None) -> "RunNotice":
        """The notice of `project`'s run; ours are the backends whose version is one `registry` (a
        `finetune.versions.VersionRegistry`) knows, or one of `also` (the version served or pinned)."""
        return cls(client, project, registry.known_versions() | {v for v in also if v})

    def backends(self) -> list[dict]:
        """Our ML backend(s) of the project, read once (listing them makes Label Studio check each)."""
        from backend.studio.api import api_json

        if self._backends is None:
            listed = api_json(self.client, "GET", "api/ml", params={"project": int(self.project)}) or []
            mine = [b for b in listed if b.get("model_version") in self.our_versions]
            self._backends = listed if len(listed) == 1 else mine
        return self._backends

    def due(self) -> bool:
        """True when a non-final notice would be shown now (not within MIN_INTERVAL_S of the last)."""
        return not self._failed and time.monotonic() - self._last >= MIN_INTERVAL_S

    def show(self, notice: str, final: bool = False, keep: bool = False) -> bool:
        """Put `notice` into the title; skipped (False) within MIN_INTERVAL_S of the last one unless `final`.
        `keep`: read it back and write it again while a concurrent save in Label Studio drops it (blocks about
        KEEP_AFTER_S)."""
        from backend.studio.api import api_error_text

        now = time.monotonic()
        if notice == self._last_text or (not final and now - self._last < MIN_INTERVAL_S):
            return False
        try:
            before = {int(b["id"]): b.get("title") for b in self.backends()}
            self._write(self.backends(), notice)
            if keep:
                self._keep(notice, before)
        except Exception as exc:  # noqa: BLE001 - a notice must never fail a run
            if not self._failed:
                log.warning("project %s: cannot show the run in the ML backend's title: %s", self.project,
                            api_error_text(exc))
            self._failed = True
            return False
        self._last, self._last_text = now, notice
        return True

    def _write(self, backends: list[dict], notice: str) -> None:
        from backend.studio.api import api_json

        for backend in backends:
            title = titled(backend.get("title"), notice)
            api_json(self.client, "PATCH", f"api/ml/{int(backend['id'])}",
                     {"title": title, "project": int(self.project), "url": backend.get("url")})
            # (without "url", Label Studio 1.23.2 answers 500: healthcheck_() missing 'url')
            backend["title"] = title

    def _keep(self, notice: str, before: dict[int, str | None]) -> None:
        """Read the titles back; where one is `before` again (a stale save's signature: the row as it was before our
        PATCH), write the notice again. A title that is neither ours nor that (a newer notice, the user's edit) is
        left alone."""
        from backend.studio.api import api_json

        for _ in range(KEEP_TRIES):
            time.sleep(KEEP_AFTER_S)
            lost = []
            for b in self.backends():
                now = (api_json(self.client, "GET", f"api/ml/{int(b['id'])}") or {}).get("title")
                if now != b["title"] and now == before.get(int(b["id"])):
                    lost.append(b)
            if not lost:
                return
            log.info("project %s: Label Studio saved an older title over the run's notice (a concurrent check of "
                     "the backend); written again", self.project)
            self._write(lost, notice)
        log.warning("project %s: the run's notice kept being overwritten in Label Studio", self.project)


def progress_notice(done: int, total: int, version: str | None, failed: int = 0) -> str:
    tail = f", {failed} without a prediction" if failed else ""
    return f"pre-labelling: {done} of {total} tasks done{tail} (model {version or 'served'}; reload to see them)"


def queued_notice(total: int | None, waiting_for_worker: bool = True) -> str:
    what = f"{total} tasks" if total else "the selected tasks"
    return f"pre-label run of {what} queued" + (" (waiting for a worker)" if waiting_for_worker else "")


def done_notice(done: int, version: str | None, failed: int = 0, at: float | None = None) -> str:
    when = time.strftime("%H:%M UTC", time.gmtime(at or time.time()))
    tail = f"; {failed} without a prediction (missing or unreadable image)" if failed else ""
    return f"{done} tasks pre-labelled at {when} with {version or 'the served model'}{tail}"


def failed_notice(error: str) -> str:
    return f"pre-label run failed: {error}"[:200]
