#!/usr/bin/env bash
# Rebuilds tests/data/old_layout: artifacts written by ganpipe as it was at commit 9286f06, before
# the restructuring (ganpipe/models.py -> ganpipe/networks/, generator loading -> generators.py,
# export split into shards/synthetic_rows/progress), plus what that code produced from them.
# tests/test_compat.py checks that the current code loads, resumes and reproduces them.
#
#   scripts/make_old_layout_fixture.sh            # from the repository root, with .venv set up
#
# The old code runs from `git archive 9286f06` with this checkout's Python environment
# (PYTHON=... to use another). Everything is written under the fixed path $WORK (absolute paths in
# run.json, result.json and the registry tags name it, as a real old GANPIPE_HOME's would; the
# test does not need them to exist). Re-running gives the same weights, rows and images; ids,
# timestamps and MLflow uuids differ.
set -euo pipefail

COMMIT=9286f0695f0880afd96356ab14d417777b3ab322
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=$ROOT/tests/data/old_layout
WORK=/tmp/ganpipe-old-layout

rm -rf "$WORK"
mkdir -p "$WORK/src" "$WORK/expected/continued"
git -C "$ROOT" archive "$COMMIT" | tar -x -C "$WORK/src"
cp "$OUT/digits.yaml" "$OUT/gaussians.yaml" "$WORK/"
cd "$WORK"

export PYTHONPATH=$WORK/src GANPIPE_HOME=$WORK/home
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
unset MLFLOW_TRACKING_URI MLFLOW_REGISTRY_URI
old() { "$PY" -m ganpipe.cli "$@"; }
json_field() { "$PY" -c 'import json, sys; print(json.loads(sys.stdin.read().splitlines()[-1])[sys.argv[1]])' "$1"; }
[[ $("$PY" -c 'import ganpipe; print(ganpipe.__file__)') == "$WORK/src/ganpipe/__init__.py" ]]

# 1. Prepared data and finished runs (6 steps of the DCGAN, 4 of the MLP).
old ingest digits.yaml --json | tail -1 > ingest-digits.json
old ingest gaussians.yaml --json | tail -1 > ingest-gaussians.json
RUN=$(old train digits.yaml --json | json_field run_dir)
GAUSS_RUN=$(old train gaussians.yaml --json | json_field run_dir)

# 2. What the old code generates from them (row i: seed 0 * 2**32 + i, labels 0..9 cycled).
old generate --model "$RUN" --num-images 10 --seed 0 --out expected/run_generate.npy --json > /dev/null
old generate --model "$GAUSS_RUN" --num-images 10 --seed 0 --out expected/gaussians_generate.npy --json > /dev/null

# 3. A registered version (the old layout: ganpipe_generator/networks.py, a copy of models.py),
#    what the old code generates from it, and its pyfunc's predictions.
old register --run "$RUN" --json | tail -1 > register.json
old generate --model models:/compat-digits/1 --num-images 10 --seed 0 \
    --out expected/registered_generate.parquet --json > /dev/null
"$PY" - <<'EOF'
import json
import shutil

import mlflow
import numpy as np
import pandas as pd

from ganpipe import tracking

tracking.configure_mlflow()
version = mlflow.MlflowClient().get_model_version("compat-digits", "1")
local = mlflow.artifacts.download_artifacts(artifact_uri="models:/compat-digits/1", dst_path="registered-download")
shutil.copytree(local, "registered/compat-digits-v1")
json.dump({"name": version.name, "version": int(version.version), "source": version.source,
           "tags": dict(sorted(version.tags.items()))}, open("registered/version.json", "w"), indent=2)
model = mlflow.pyfunc.load_model("models:/compat-digits/1")
np.save("expected/pyfunc_predict.npy", model.predict(pd.DataFrame({"seed": [0, 1, 2, 3], "label": [3, 3, 7, 1]})))
EOF

# 4. An export of that version: 40 rows in shards of 16 (the last one partial).
old export --model models:/compat-digits/1 --num-images 40 --shard-size 16 --class-balance \
    --out "$WORK/export" --json | tail -1 > export.json

# The fixture is the state so far (without the MLflow store: the test registers the version into
# a fresh one). Copied before step 5 changes the run.
mkdir -p fixture/home
cp -r home/prepared home/runs fixture/home/
cp -r export fixture/
# The version's folder is packed: it holds the old code's modules (copies of today's, to a reader
# of the tree); tests/test_compat.py unpacks it.
mkdir -p fixture/registered
cp registered/version.json fixture/registered/
tar -czf fixture/registered/compat-digits-v1.tar.gz -C registered compat-digits-v1

# 5. The old code continuing the run to 10 steps (what a resume with the current code must match).
old train digits.yaml --set train.steps=10 --json | tail -1 > continued.json
cp "$RUN/generator/generator.safetensors" expected/continued/
cp "$RUN/checkpoints/step-00000010/G.safetensors" "$RUN/checkpoints/step-00000010/D.safetensors" expected/continued/
old generate --model "$RUN" --num-images 10 --seed 0 --out expected/continued/generate.npy --json > /dev/null

"$PY" - "$COMMIT" "$GAUSS_RUN" <<'EOF'
import hashlib
import json
import sys
from pathlib import Path

def load(name):
    return json.loads(Path(name).read_text())

ingest, gauss, export, continued = (load(f) for f in ("ingest-digits.json", "ingest-gaussians.json",
                                                       "export.json", "continued.json"))
files = sorted(p for p in Path("expected").rglob("*") if p.is_file())
expected = {
    "commit": sys.argv[1],
    "digits": {"fingerprint": ingest["fingerprint"], "num_records": ingest["num_records"],
               "run": Path(continued["run_dir"]).name, "steps": 6},
    "gaussians": {"fingerprint": gauss["fingerprint"], "num_records": gauss["num_records"],
                  "run": Path(sys.argv[2]).name},
    "continued": {"steps": continued["steps"], "resumed_from_step": continued["resumed_from_step"],
                  "checkpoint": Path(continued["checkpoint"]).name},
    "export": {"num_images": export["num_images"], "num_shards": export["num_shards"],
               "per_class_counts": export["per_class_counts"]},
    "sha256": {str(p.relative_to("expected")): hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
}
Path("expected/expected.json").write_text(json.dumps(expected, indent=2) + "\n")
EOF
cp -r expected fixture/

rm -rf "$OUT/home" "$OUT/registered" "$OUT/export" "$OUT/expected"
cp -r fixture/home fixture/registered fixture/export fixture/expected "$OUT/"
echo "wrote $OUT ($(du -sh "$OUT" | cut -f1))"
