"""The stages a job runs, in order, and the CLI command that runs each set: one place for the
names the pipeline, the Python API, the CLI and ``kdscale submit`` all use."""

STAGES = ("precompute", "train", "eval")

# `kdscale <command> JOB.yaml` runs these stages (and a submitted job runs the same command).
COMMANDS: dict[str, tuple[str, ...]] = {"run": STAGES, **{stage: (stage,) for stage in STAGES}}
