"""The ``kdscale`` command line: run a job or one stage of it, and inspect or verify caches.

Exit codes: 0 success; 1 a cache or run failed (corrupt shard, training error); 2 the job spec or
its inputs are invalid (nothing was written).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from kdscale.cache.format import CacheFormatError
from kdscale.config import ConfigError, JobSpec, load_job
from kdscale.errors import find_in_chain
from kdscale.progress import make_console
from kdscale.stages import COMMANDS

app = typer.Typer(
    help="Knowledge distillation at scale: teacher once -> Parquet logit cache -> many students.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="Inspect and verify logit caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
jobs_app = typer.Typer(help="Jobs submitted to a Ray cluster with `kdscale submit`.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
out = make_console()
err = make_console(stderr=True)

# Failures with a message that says everything (raised in the driver, a teacher actor or a training
# worker): printed as one line, exit 1, no traceback.
RUN_FAILURES = ("NonFiniteLoss", "NonFiniteStudent", "TeacherStartTimeout", "CacheFormatError")

JobArg = typer.Argument(..., exists=False, help="Job spec (YAML), e.g. jobs/quickstart.yaml")
WorkdirOpt = typer.Option(None, "--workdir", help="Where outputs go (default: the spec's workdir or runs/<name>).")
SetOpt = typer.Option(
    None,
    "--set",
    help="Override a spec field: KEY=VALUE with a dotted key and a YAML value, e.g. "
    "--set students.0.train.lr=3e-4 (repeatable).",
)
DryRunOpt = typer.Option(False, "--dry-run", help="Validate the spec and print the plan; do no work.")


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(path: Path, overrides: list[str] | None = None) -> JobSpec:
    try:
        return load_job(path, overrides=overrides)
    except ConfigError as e:
        _fail(str(e), 2)
        raise  # unreachable; keeps type checkers happy


def _run(job: Path, stages: tuple[str, ...], workdir: str | None, dry_run: bool, overrides: list[str] | None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from kdscale import api
    from kdscale import summary as summary_files

    hf_logging.disable_progress_bar()
    from kdscale.data.corpus import CorpusError
    from kdscale.precompute.plan import PlanError
    from kdscale.tracking.lineage import TrackingUnavailable

    spec = _load(job, overrides)
    try:
        if dry_run:
            out.print_json(json.dumps(api.plan(spec, stages, workdir)))
            return
        summary = api.run_stages(spec, stages, workdir).summary
    except (ConfigError, PlanError, TrackingUnavailable, CorpusError) as e:
        _fail(str(e), 2)
    except CacheFormatError as e:
        _fail(str(e), 1)
    except Exception as e:
        failure = find_in_chain(e, RUN_FAILURES)
        if failure is None:
            raise
        _fail(str(failure), 1)
    mlflow = summary.get("mlflow", {})
    from kdscale import fs

    report_file = fs.join(summary["workdir"], summary_files.REPORT_FILES[0])
    if "students" in summary and fs.exists(report_file):
        _print_report(fs.read_json(report_file))
    out.print(f"[bold green]done[/] summary: {os.path.join(summary['workdir'], summary_files.SUMMARY)}")
    out.print(
        f"MLflow: experiment '{mlflow.get('experiment')}' in {mlflow.get('tracking_uri')} "
        f"(browse: mlflow ui --backend-store-uri {mlflow.get('tracking_uri')})",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def run(
    job: Path = JobArg,
    workdir: str | None = WorkdirOpt,
    dry_run: bool = DryRunOpt,
    overrides: list[str] | None = SetOpt,
) -> None:
    """Precompute the cache, train every student, evaluate and export them."""
    _run(job, COMMANDS["run"], workdir, dry_run, overrides)


@app.command()
def precompute(
    job: Path = JobArg,
    workdir: str | None = WorkdirOpt,
    dry_run: bool = DryRunOpt,
    overrides: list[str] | None = SetOpt,
) -> None:
    """Run the teacher over the corpus into the logit cache (resumes an unfinished one)."""
    _run(job, COMMANDS["precompute"], workdir, dry_run, overrides)


@app.command()
def train(
    job: Path = JobArg,
    workdir: str | None = WorkdirOpt,
    dry_run: bool = DryRunOpt,
    overrides: list[str] | None = SetOpt,
) -> None:
    """Train, evaluate and export the job's students from its committed cache."""
    _run(job, COMMANDS["train"], workdir, dry_run, overrides)


@app.command("eval")
def evaluate(job: Path = JobArg, workdir: str | None = WorkdirOpt, overrides: list[str] | None = SetOpt) -> None:
    """Evaluate the job's exported students on the cache's held-out split."""
    _run(job, COMMANDS["eval"], workdir, False, overrides)


def _print_report(report: dict) -> None:
    from kdscale.report import table_rows

    headers, cells = table_rows(report)
    table = Table(
        title=f"students of job {report['job']}" + (f" vs baseline {report['baseline']}" if report["baseline"] else "")
    )
    for h in headers:
        table.add_column(h, overflow="fold")
    for row in cells:
        table.add_row(*(escape(c) for c in row))
    out.print(table)
    teacher = report.get("teacher_heldout_ce")
    note = f"teacher held-out CE {teacher:.4f}. " if teacher is not None else ""
    out.print(
        f"{note}Δ ± two paired standard errors; a verdict other than 'within noise' needs "
        f"{escape(report['noise_rule'])}.",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def report(
    workdir: str = typer.Argument(..., help="A job's workdir (holding summary.json), path or fsspec URI"),
    baseline: str | None = typer.Option(
        None,
        "--baseline",
        help="The student the others are compared with (default: the only one trained with alpha 0).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Every student a job trained beside its baseline: CE, Δ, noise verdict, bytes/token, cost.

    Writes report.json / report.md / report.png into the workdir and logs them to the job's MLflow
    parent run (MLFLOW_TRACKING_URI, else the URI the job recorded)."""
    from kdscale import api
    from kdscale.report import ReportError

    try:
        result = api.report(workdir, baseline)
    except ReportError as e:
        _fail(str(e), 2)
    if result.not_logged:
        err.print(f"[yellow]warning:[/] report not logged to MLflow ({escape(result.not_logged)})")
    rep = result.data
    if as_json:
        print(json.dumps(rep))
        return
    _print_report(rep)


def _cache(call, uri: str):
    """``call(uri)`` on a cache through the one verification every reader uses; exit 1 listing
    every problem, or saying why the cache could not be read (no traceback)."""
    from kdscale import fs

    try:
        return call(fs.normalize(uri))
    except CacheFormatError as e:
        _fail(str(e), 1)
    except Exception as e:  # an unreachable endpoint, a permission error: say which
        _fail(f"cannot read the cache at {uri}: {type(e).__name__}: {str(e)[:300]}", 1)


@cache_app.command("inspect")
def cache_inspect(
    uri: str = typer.Argument(..., help="Cache folder (path or fsspec URI)"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a committed cache's kind, size, bytes per token and fingerprints."""
    from kdscale import api

    info = _cache(api.describe_cache, uri)
    if as_json:
        print(json.dumps(info))
        return
    table = Table(title=f"cache {info['cache_id']}", show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in info.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            table.add_row(f"{key}.{sub}" if sub else key, str(v))
    out.print(table)


@cache_app.command("verify")
def cache_verify(uri: str = typer.Argument(..., help="Cache folder (path or fsspec URI)")) -> None:
    """Check a cache as every reader does, plus every file's sha256; exit 1 listing each problem."""
    from kdscale import api

    m = _cache(lambda u: api.open_cache(u, checksums=True).manifest, uri)
    out.print(f"[green]ok[/] {len(m.shards)} shards match the manifest (cache {m.cache_id})")


@cache_app.command("import")
def cache_import(
    src: str = typer.Argument(..., help="The other tool's output folder or file (path or fsspec URI)."),
    dest: str = typer.Argument(..., help="Where the kdscale cache is written (path or fsspec URI)."),
    fmt: str = typer.Option(..., "--format", help="distillkit (compressed Parquet) or vllm-topk (JSONL/Parquet)."),
    tokenizer: str = typer.Option(
        ..., "--tokenizer", help="The teacher's tokenizer: HF folder or GGUF file (checked against the source)."
    ),
    teacher_name: str | None = typer.Option(None, "--teacher-name", help="Recorded as the cache's teacher."),
    seq_len: int = typer.Option(256, "--seq-len", help="Positions per kdscale row (longer sequences are cut)."),
    heldout: float = typer.Option(0.1, "--heldout-fraction", help="Rows held out by content hash."),
    validation: float = typer.Option(0.0, "--validation-fraction", help="Rows kept for validation."),
    experiment: str | None = typer.Option(None, "--experiment", help="MLflow experiment (default kdscale-imports)."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow tracking URI."),
    no_tracking: bool = typer.Option(False, "--no-tracking", help="Record nothing in MLflow."),
) -> None:
    """Import another tool's teacher outputs (DistillKit, vLLM / axolotl top-k) as a kdscale topk cache."""
    from pydantic import ValidationError

    from kdscale import api
    from kdscale.interop.rows import SourceError
    from kdscale.tracking.lineage import TrackingUnavailable

    try:
        settings = api.ImportSettings(
            teacher_name=teacher_name, seq_len=seq_len, heldout_fraction=heldout, validation_fraction=validation
        )
        result = api.import_cache(
            src,
            dest,
            fmt,
            tokenizer,
            settings,
            tracking=not no_tracking,
            experiment=experiment,
            tracking_uri=tracking_uri,
        )
    except ValidationError as e:
        options = {"seq_len": "--seq-len", "heldout_fraction": "--heldout-fraction"}
        problems = [f"{options.get(str(err['loc'][0]), err['loc'][0])}: {err['msg']}" for err in e.errors()]
        _fail("bad import settings: " + "; ".join(problems), 2)
    except (SourceError, TrackingUnavailable) as e:
        _fail(str(e), 2)
    except CacheFormatError as e:
        _fail(str(e), 1)
    m, q = result.cache.manifest, result.quality
    verb = "already imported, verified" if result.reused else "imported"
    out.print(
        f"[green]Cache {m.cache_id} {verb}[/]: {q['rows']:,} rows x {m.dataset.seq_len} = {m.totals['tokens']:,} "
        f"tokens, top-{m.targets.k}, {m.totals['bytes_per_token']:.1f} B/token, at {escape(result.cache.uri)}"
    )
    out.print(
        f"Source values: mean mass {q['mean_mass']:.4f}, max {q['max_mass']:.4f}; "
        f"{q['positions_mass_over_1']:,} of {q['positions']:,} positions above 1 (tail clamped to 0); "
        f"next token in the top-{m.targets.k} at {100 * q['next_token_in_topk']:.1f}% of positions; "
        f"{q['dropped_positions']:,} positions dropped at sequence ends; {q['context_exact_rows']:,} of "
        f"{q['rows']:,} rows context-exact."
    )
    if result.run_id:
        out.print(f"MLflow run {result.run_id}")


@cache_app.command("export")
def cache_export(
    cache: str = typer.Argument(..., help="A kdscale topk or stratified cache."),
    dest: str = typer.Argument(..., help="Folder for the exported files (one JSONL per shard)."),
    fmt: str = typer.Option("vllm-topk", "--format", help="vllm-topk (parallel id / log-prob lists)."),
) -> None:
    """Export a kdscale cache's top-k log-probs for other tools (vLLM-topk JSONL)."""
    from kdscale import api
    from kdscale.interop.rows import SourceError

    try:
        rows = api.export_cache(cache, dest, fmt)
    except SourceError as e:
        _fail(str(e), 2)
    except CacheFormatError as e:
        _fail(str(e), 1)
    out.print(f"[green]Exported[/] {sum(rows.values()):,} rows ({rows}) to {escape(dest)}")


AddressOpt = typer.Option(None, "--address", help="The cluster's dashboard, http://HEAD:8265 (default: RAY_ADDRESS).")


@app.command()
def submit(
    job: Path = JobArg,
    address: str | None = AddressOpt,
    workdir: str = typer.Option(
        ..., "--workdir", help="Where the job's outputs go: a URI the cluster writes (s3://...)."
    ),
    follow: bool = typer.Option(False, "--follow", help="Stream the job's logs; exit with its status."),
    overrides: list[str] | None = SetOpt,
    allow_local_paths: bool = typer.Option(
        False, "--allow-local-paths", help="Allow absolute local paths (a filesystem every node mounts)."
    ),
    stage: str = typer.Option(
        "run", "--stage", help="What the job runs: run (every stage), precompute, train or eval."
    ),
) -> None:
    """Run a job on a Ray cluster through Ray Jobs (validated here first; nothing is submitted otherwise)."""
    from kdscale import submit as jobs

    try:
        job_id = jobs.submit(
            job,
            address=address,
            workdir=workdir,
            overrides=overrides or [],
            allow_local_paths=allow_local_paths,
            stage=stage,
        )
    except ConfigError as e:
        _fail(str(e), 2)
    except jobs.SubmitError as e:
        _fail(str(e), 2)
    out.print(f"[green]Submitted[/] {job_id}", highlight=False)
    if follow:
        _follow(address, job_id)


def _follow(address: str | None, job_id: str) -> None:
    """Stream the job's logs until it ends, then exit with 0 if it succeeded, 1 otherwise."""
    from kdscale import submit as jobs

    state = _jobs_call(jobs.follow, address, job_id, lambda lines: print(lines, end="", flush=True))
    out.print(f"job {job_id}: {state}", highlight=False)
    raise typer.Exit(0 if state == "SUCCEEDED" else 1)


def _jobs_call(call, *args):
    from kdscale import submit as jobs

    try:
        return call(*args)
    except jobs.SubmitError as e:
        _fail(str(e), 2)
    except Exception as e:  # an unknown job id, a job already ended: Ray's own words
        _fail(f"{type(e).__name__}: {str(e)[:500]}", 1)


@jobs_app.command("status")
def jobs_status(job_id: str, address: str | None = AddressOpt) -> None:
    """A submitted job's status."""
    from kdscale import submit as jobs

    print(json.dumps(_jobs_call(jobs.status, address, job_id)))


@jobs_app.command("list")
def jobs_list(
    address: str | None = AddressOpt,
    as_json: bool = typer.Option(False, "--json", help="One JSON list instead of the table"),
) -> None:
    """Jobs submitted with `kdscale submit`, newest first: id, job, stage, workdir, status, times."""
    from kdscale import submit as jobs

    rows = _jobs_call(jobs.list_jobs, address)
    if as_json:
        print(json.dumps(rows))
        return
    columns = ("job_id", "job", "stage", "workdir", "status", "started", "ended")
    table = Table(*columns, title=f"{len(rows)} kdscale job(s)")
    for row in rows:
        table.add_row(*(escape(str(row[c] or "–")) for c in columns))
    out.print(table)


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    address: str | None = AddressOpt,
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends; exit 1 unless it succeeded"),
) -> None:
    """A submitted job's logs so far (``--follow``: streamed until it ends, as ``submit --follow``)."""
    from kdscale import submit as jobs

    if follow:
        _follow(address, job_id)
    print(_jobs_call(jobs.logs, address, job_id), end="")


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: str | None = AddressOpt) -> None:
    """Stop a submitted job."""
    from kdscale import submit as jobs

    stopped = _jobs_call(jobs.stop, address, job_id)
    out.print(f"job {job_id}: {'stop requested' if stopped else 'not running'}", highlight=False)


@app.command()
def lineage(
    model: str | None = typer.Argument(None, help="Registered model as MODEL (latest version) or MODEL/VERSION."),
    cache: str | None = typer.Option(
        None, "--cache", help="List every student trained from this cache (URI or cache_id)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    tracking: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."
    ),
) -> None:
    """Walk a student back to its cache, teacher and corpus, or a cache forward to its students."""
    from mlflow import MlflowClient

    from kdscale.tracking.lineage import TrackingUnavailable, check_reachable, tracking_uri
    from kdscale.tracking.query import LineageError, cache_lineage, model_lineage

    if (model is None) == (cache is None):
        _fail("give a registered MODEL[/VERSION] or --cache URI (one of them)", 2)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep --json output parseable
    uri = tracking or tracking_uri()
    try:
        check_reachable(uri)
        client = MlflowClient(uri)
        info = model_lineage(client, model) if model else cache_lineage(client, cache)
    except TrackingUnavailable as e:
        _fail(str(e), 2)
    except LineageError as e:
        _fail(str(e), 1)
    if as_json:
        print(json.dumps(info, default=str))
        return
    out.print(_lineage_tree(info), highlight=False)


def _lineage_tree(info: dict):
    from rich.tree import Tree

    def add(node, title: str, block: dict | None, keys: tuple[str, ...]) -> None:
        if not block:
            return
        branch = node.add(f"[bold]{title}[/]")
        for key in keys:
            if block.get(key) not in (None, {}, []):
                branch.add(f"{key}: {escape(str(block[key]))}")

    if "model" in info:
        mv = info["model"]
        root = Tree(f"[bold cyan]model {escape(mv['name'])} v{mv['version']}[/] ({escape(mv['source'])})")
        add(
            root,
            "student run",
            info["student_run"],
            ("student", "run_id", "experiment", "job", "status", "metrics", "params"),
        )
    else:
        root = Tree(f"[bold cyan]cache {info['cache']['cache_id']}[/]")
    add(root, "cache", info.get("cache"), ("uri", "cache_id", "manifest_from", "manifest", "warning"))
    add(root, "precompute run", info.get("precompute_run"), ("run_id", "experiment", "job", "status", "metrics"))
    add(root, "imported from", info.get("origin"), ("format", "uri", "files", "config", "quality"))
    add(root, "teacher", info.get("teacher"), ("name", "fingerprint", "dtype", "source"))
    add(root, "corpus", info.get("corpus"), ("patterns", "documents", "tokens", "content_hash"))
    for problem in info.get("checks", []):
        root.add(f"[bold red]inconsistent:[/] {escape(problem)}")
    for st in info.get("students", []):
        versions = ", ".join(f"{v['name']} v{v['version']}" for v in st["registered"]) or "not registered"
        ce = st["metrics"].get("heldout/heldout_ce")
        root.add(
            f"[bold]student {escape(str(st['student']))}[/] run {st['run_id']} (job {escape(str(st['job']))}, "
            f"{st['status']}{'' if ce is None else f', held-out CE {ce:.3f}'}) -> {escape(versions)}"
        )
    return root


if __name__ == "__main__":
    app()
