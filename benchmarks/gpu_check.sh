#!/usr/bin/env bash
# Every GPU check in one go (issue 17), for a CUDA machine, from the repository root: the `gpu`
# tests (CUDA extraction against the CPU's, the tiny job on a GPU teacher and ZeRO-2 / ZeRO-3 bf16
# GPU students), then benchmarks/gpu_throughput.py with the arguments given. Logs and the
# benchmark's JSON line go to $OUT (default ./gpu-out). Each step runs even if one before failed;
# the exit status is the number of failed steps.
#
# A bare GPU machine (torch with CUDA, without kdscale's other dependencies) gets them from a
# tarball of an installed site-packages folder: KDSCALE_SITE_TARBALL=site.tar.xz, unpacked to
# /tmp/kdscale-site and put on PYTHONPATH with this checkout. As run on a lent H200 (2026-12-04),
# after `.venv/bin/python benchmarks/gpu_site.py --have have.txt --data` (.gpu/ git-ignored, carried):
#   python3 -c "import tarfile; tarfile.open('.gpu/pydocs.tar.xz').extractall('/tmp/pydocs', filter='tar')"
#   KDSCALE_SITE_TARBALL=.gpu/site.tar.xz bash benchmarks/gpu_check.sh --weights random \
#     --tokenizer .gpu/smollm2-tokenizer --corpus '/tmp/pydocs/library/*.rst.txt' --tokens 524288
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda TOKENIZERS_PARALLELISM=false
if [ -n "${KDSCALE_SITE_TARBALL:-}" ]; then
  python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall('/tmp/kdscale-site', filter='tar')" \
    "$KDSCALE_SITE_TARBALL" || exit 99
  export PYTHONPATH="/tmp/kdscale-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
failed=0
step() { # name, command...: run it, its output in $OUT/<name>.log, and count a failure
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1 || { failed=$((failed + 1)); echo "!! $name failed"; }
  echo "== $name took $((SECONDS - t0)) s"; tail -n 15 "$OUT/$name.log"
}
nvidia-smi -L
step versions python3 -c "import torch, ray, deepspeed, mlflow, transformers, pydantic, typer; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'mlflow', mlflow.__version__, 'transformers', transformers.__version__, 'typer', typer.__version__)"
step gpu_tests python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="-ra --strict-markers --durations=10" tests/test_extraction.py tests/test_loop.py
step gpu_throughput python3 benchmarks/gpu_throughput.py "$@"
grep '^{' "$OUT/gpu_throughput.log" | tail -n 1 > "$OUT/gpu_throughput.json"
exit $failed
