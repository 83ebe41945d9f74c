"""Shared fixtures: a real S3 endpoint on loopback (moto's server) and small corpora."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the Prefect test server never needs telemetry; its read-then-write transaction can also meet
# SQLite's immediate "database is locked" (see flows/local_server.py)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one torch thread is several times faster than
    two contending ones. A module opts in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server (prefect_test_harness: a real API server on loopback over a
    temporary SQLite database) for every flow test of the session; starting one costs ~20 s.
    Flows run in this process report to it; deployment and flow-run names keep tests apart."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start ``moto_server`` on 127.0.0.1 and point every S3 client at it.

    This is a real HTTP S3 endpoint (moto's server mode), not an in-process mock: s3fs,
    pyarrow and ray talk to it over loopback exactly as they would to S3 or MinIO.
    """
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not found: install the dev extras (pip install -e '.[dev]')")
    port = _free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import urllib.request

    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:  # noqa: BLE001
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto_server did not start")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket; returns its ``s3://`` URL."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    fs.mkdir(name)
    yield f"s3://{name}"


def noisy_config(seed: int = 7, pairs: int = 60, docs: int = 16, videos: int = 14):
    """A small corpus where every noise type shows up (high rates, fixed seed)."""
    from curation.corpus.synth import NOISE_TYPES, DatasetSpec, SynthConfig

    def even(kind: str, total: float) -> dict[str, float]:
        names = NOISE_TYPES[kind]
        return {n: total / len(names) for n in names}

    return SynthConfig(
        seed=seed,
        datasets=[
            DatasetSpec("coyo_synth", "pair", pairs, even("pair", 0.75), 25),
            DatasetSpec("mmc4_synth", "interleaved", docs, even("interleaved", 0.7), 16),
            DatasetSpec("video_synth", "video", videos, even("video", 0.7), 14),
        ],
        video_frames=6,
    )


@pytest.fixture(scope="session")
def noisy_corpus(tmp_path_factory):
    from curation.corpus.synth import synthesize

    out = str(tmp_path_factory.mktemp("corpus"))
    result = synthesize(out, noisy_config())
    return out, result
