"""Real backing services for server-mode tests, on loopback only: a throwaway PostgreSQL cluster
(Debian's `postgresql` binaries, initdb'd in a temp folder) and an `mlflow server` that keeps its
runs in that database and its artifacts in S3 (moto_server). Started once per test session by the
fixtures in conftest.py, and only when a test asks for them."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("pg_ctl")
    if exe:
        return Path(exe).parent
    raise RuntimeError("PostgreSQL binaries not found: install Debian's `postgresql` (bash infra/setup.sh test does)")


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root; CI containers run as root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class Postgres:
    def __init__(self, port: int):
        self.port = port
        self.bin = postgres_bin()
        self.dir = tempfile.mkdtemp(prefix="kdscale-pg-")
        self.data = os.path.join(self.dir, "data")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run(
            "pg_ctl",
            "-D",
            self.data,
            "-l",
            os.path.join(self.dir, "log"),
            "-w",
            "-t",
            "60",
            "start",
            "-o",
            f"-p {port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
        )

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(_as_postgres_user([str(self.bin / tool), *args]), check=True, capture_output=True)

    def create_database(self, name: str) -> str:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"  # psycopg2-binary is in the dev extra

    def stop(self) -> None:
        subprocess.run(
            _as_postgres_user([str(self.bin / "pg_ctl"), "-D", self.data, "-m", "fast", "stop"]), capture_output=True
        )
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(url: str, seconds: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


def start_mlflow_server(backend_uri: str, artifacts: str, port: int, log_path: str) -> subprocess.Popen:
    """`mlflow server` with proxied artifacts: clients upload through the server, which alone
    holds the object-store address (MLFLOW_S3_ENDPOINT_URL and AWS_* from the environment)."""
    exe = Path(sys.executable).with_name("mlflow")
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            str(exe),
            "server",
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            artifacts,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", 180, proc)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"mlflow server did not start; its log: {Path(log_path).read_text()[-3000:]}") from None
    return proc
