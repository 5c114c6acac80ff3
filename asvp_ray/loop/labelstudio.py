"""Push a round's tasks to a Label Studio server and pull its annotations, through its REST API.

The API token comes from the environment variable ``LABEL_STUDIO_API_KEY`` only (never a
command-line argument nor a file in the run directory). Both kinds of Label Studio token work:
a personal access token (a JWT refresh token, exchanged at ``/api/token/refresh``) and a legacy
token (sent as ``Authorization: Token ...``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from asvp_ray.core.errors import BadInputError

log = logging.getLogger(__name__)

TOKEN_ENV = "LABEL_STUDIO_API_KEY"
EXPORT_FORMATS = ("JSON", "JSON_MIN", "CSV", "TSV")


class LabelStudioError(BadInputError):
    """The Label Studio server refused a request or cannot be reached."""


class LabelStudio:
    """A small client of Label Studio's REST API (projects, task import, storages, export).

    Args:
        url: the server, e.g. ``http://127.0.0.1:8080``.
        token: the API token (default: ``$LABEL_STUDIO_API_KEY``).
        timeout: seconds per request.
    """

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 60.0):
        import requests

        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        if not token:
            raise LabelStudioError(f"no Label Studio API token: set the environment variable {TOKEN_ENV} (Label "
                                   "Studio: Account & Settings > Personal Access Token, or Legacy Token)")
        self.timeout = timeout
        self.session = requests.Session()
        if token.count(".") == 2:  # a personal access token (JWT refresh token)
            r = self._request("POST", "/api/token/refresh", json={"refresh": token}, auth=False)
            self.session.headers["Authorization"] = f"Bearer {r.json()['access']}"
        else:
            self.session.headers["Authorization"] = f"Token {token}"

    def _request(self, method: str, path: str, auth: bool = True, **kw):
        import requests

        try:
            r = self.session.request(method, self.url + path, timeout=self.timeout, **kw)
        except requests.RequestException as e:
            raise LabelStudioError(f"Label Studio at {self.url} cannot be reached ({type(e).__name__}: {e}); check "
                                   "the URL and that the server runs") from None
        if r.status_code in (401, 403):
            raise LabelStudioError(f"Label Studio at {self.url} refused the token ({r.status_code} on {method} "
                                   f"{path}: {r.text[:200]}); check {TOKEN_ENV}")
        if r.status_code >= 400:
            raise LabelStudioError(f"Label Studio {method} {path} failed: {r.status_code} {r.text[:500]}")
        return r

    # ------------------------------------------------------------------ projects
    def find_project(self, title: str) -> Optional[Dict[str, Any]]:
        """The project with exactly this title, or None. Raises if several have it."""
        found, page = [], 1
        while True:
            j = self._request("GET", "/api/projects", params={"title": title, "page": page, "page_size": 100}).json()
            found += [p for p in j["results"] if p["title"] == title]
            if not j.get("next"):
                break
            page += 1
        if len(found) > 1:
            raise LabelStudioError(f"{len(found)} Label Studio projects are titled {title!r} (ids "
                                   f"{[p['id'] for p in found]}); rename all but one")
        return found[0] if found else None

    def ensure_project(self, title: str, label_config: str) -> Dict[str, Any]:
        """Create the project, or set its labelling config when it exists."""
        p = self.find_project(title)
        if p is None:
            p = self._request("POST", "/api/projects", json={"title": title, "label_config": label_config}).json()
            log.info("created Label Studio project %r (id %s)", title, p["id"])
        elif p.get("label_config", "").strip() != label_config.strip():
            p = self._request("PATCH", f"/api/projects/{p['id']}", json={"label_config": label_config}).json()
        return p

    def task_asvp_ids(self, project_id: int) -> set:
        """``data.asvp_id`` of every task in the project."""
        out, page = set(), 1
        while True:
            r = self.session.get(self.url + "/api/tasks", timeout=self.timeout,
                                 params={"project": project_id, "page": page, "page_size": 500, "fields": "all"})
            if r.status_code == 404:  # past the last page
                break
            if r.status_code >= 400:
                raise LabelStudioError(f"Label Studio GET /api/tasks failed: {r.status_code} {r.text[:300]}")
            tasks = r.json().get("tasks", [])
            out |= {t["data"]["asvp_id"] for t in tasks if "asvp_id" in (t.get("data") or {})}
            if len(tasks) < 500:
                break
            page += 1
        return out

    def import_tasks(self, project_id: int, tasks: List[Dict[str, Any]]) -> int:
        """Import the tasks whose asvp_id the project does not have yet; returns how many."""
        have = self.task_asvp_ids(project_id)
        new = [t for t in tasks if t["data"]["asvp_id"] not in have]
        if new:
            self._request("POST", f"/api/projects/{project_id}/import", json=new)
        return len(new)

    def ensure_local_storage(self, project_id: int, folder: str) -> Optional[str]:
        """A Local Files storage of the project covering ``folder`` (Label Studio serves a local
        file only under such a storage). Returns None when done, else why it could not be made."""
        folder = os.path.abspath(folder)
        have = self._request("GET", "/api/storages/localfiles", params={"project": project_id}).json()
        if any(folder == s["path"] or folder.startswith(s["path"].rstrip("/") + "/") for s in have):
            return None
        r = self.session.post(self.url + "/api/storages/localfiles", timeout=self.timeout,
                              json={"project": project_id, "path": folder, "title": "asvp-ray images",
                                    "use_blob_urls": False, "regex_filter": ""})
        if r.status_code >= 400:
            return r.text[:400]
        return None

    def export(self, project_id: int, fmt: str = "JSON") -> bytes:
        """The project's export in one of ``EXPORT_FORMATS`` (every task, cumulative)."""
        if fmt not in EXPORT_FORMATS:
            raise LabelStudioError(f"export format {fmt!r} is not one of {EXPORT_FORMATS}")
        return self._request("GET", f"/api/projects/{project_id}/export",
                             params={"exportType": fmt, "download_all_tasks": "true"}).content


def push_round(url: str, project: str, files: List[Path], image_folders: List[str]) -> Dict[str, Any]:
    """Create/update the project with the labelling config and import the round's tasks.

    Args:
        files: ``[round-K.csv, round-K.labelstudio.json, labelstudio-config.xml]`` as written by
            ``write_queries``.
        image_folders: local folders the tasks' images live in (a Local Files storage is made for
            each, so the server serves them).
    """
    import json

    ls = LabelStudio(url)
    cfg = Path(files[2]).read_text()
    tasks = json.loads(Path(files[1]).read_text())
    p = ls.ensure_project(project, cfg)
    n = ls.import_tasks(p["id"], tasks)
    storage_problems = {}
    if any(t["data"]["image"].startswith("/data/local-files/") for t in tasks):
        for folder in image_folders:
            why = ls.ensure_local_storage(p["id"], folder)
            if why:
                storage_problems[folder] = why
    return {"project_id": p["id"], "imported": n, "skipped": len(tasks) - n, "storage_problems": storage_problems}


def pull_export(url: str, project: str, dest: Path, fmt: str = "JSON") -> Path:
    """Download the project's export to ``dest`` (the file ``asvp-ray label`` then reads)."""
    from asvp_ray.storage.atomic import atomic_write_bytes

    ls = LabelStudio(url)
    p = ls.find_project(project)
    if p is None:
        raise LabelStudioError(f"no Label Studio project titled {project!r} at {url}; push the round first with "
                               f"`asvp-ray select RUN --labelstudio {url} --project {project!r}`")
    atomic_write_bytes(dest, ls.export(p["id"], fmt))
    return dest
