#!/usr/bin/env bash
# GPU smoke test: one command for a machine with one CUDA GPU, in under 8 minutes.
#
#   bash bench/gpu_smoke.sh [OUT_DIR]          # OUT_DIR: default $OUT if set, else a new temp dir
#   bash bench/gpu_smoke.sh --preflight-only   # only check what the machine has, then stop
#
# Runs, each under its own time limit, while nvidia-smi samples the GPU once a second:
#   1. tests/test_gpu.py (its CPU tests and the tests marked gpu, which need CUDA),
#   2. bench/extract.py (Fashion-MNIST, EfficientNet-Lite0): its Ray side extracts on the GPU
#      (device auto on a cluster with a GPU); its plain loop stays on the CPU,
#   3. a short ASVP run: examples/smoke.yaml with extract.device=cuda, train.use_gpu=true and a
#      refresh every round, so that extraction and fine-tuning both run on the GPU.
# and writes OUT_DIR/gpu_smoke.json (and prints it): extraction images/s, fine-tune seconds per
# epoch, GPU utilisation and memory per stage, each stage's exit code and seconds; the logs of
# every stage lie next to it.
#
# The machine needs no network, but it needs everything below installed or carried to it. The
# preflight checks all of it first and, when something is missing, prints exactly what and how to
# get it there, and exits 2 without running anything:
#   - python >= 3.10 (PYTHON=/path/to/python picks another; default .venv/bin/python, else python3);
#   - torch with CUDA that sees a GPU (the machine's own build; torchvision built for it);
#   - ray==2.60.0 with its data, train and tune parts, timm, and the project's other dependencies
#     (pyproject.toml), pytest;
#   - the Fashion-MNIST IDX files (30 MB: the four .gz files; $ASVP_FASHION_MNIST names their folder).
# asvp_ray itself is used from this checkout (PYTHONPATH), not installed.
#
# Time limits (seconds; the stages stop there and the script goes on): GPU_SMOKE_TESTS_S (210),
# GPU_SMOKE_EXTRACT_S (90), GPU_SMOKE_RUN_S (150). GPU_SMOKE_IMAGES (10000): bench/extract.py's
# --images. GPU_SMOKE_RUN_SET: extra `--set key=value` arguments for the ASVP run (later ones win).
# GPU_SMOKE_FORCE=1 runs the stages even when the preflight fails: a check of this script itself on
# a machine without CUDA (the GPU tests skip, and its figures are CPU figures or failures).
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=$(command -v python3 || echo python3)
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export ASVP_RAY_DASHBOARD=${ASVP_RAY_DASHBOARD:-0}   # no dashboard: faster Ray start-ups, nothing to see here
export TQDM_DISABLE=1

PREFLIGHT_ONLY=0
if [[ "${1:-}" == "--preflight-only" ]]; then PREFLIGHT_ONLY=1; shift; fi

# --------------------------------------------------------------------------- preflight
if ! command -v "$PY" >/dev/null 2>&1 && [[ ! -x "$PY" ]]; then
  echo "MISSING: python ($PY not found); set PYTHON=/path/to/python3.10-or-later" >&2
  exit 2
fi
"$PY" - <<'PYEOF'
import importlib
import os
import re
import shutil
import sys

missing = []   # (what, how)
warnings = []
to_download = []  # requirement strings for pip download


def need(what, how, req=None):
    missing.append((what, how))
    if req:
        to_download.append(req)


if sys.version_info < (3, 10):
    print(f"MISSING: python >= 3.10 (this is {sys.version.split()[0]} at {sys.executable}); "
          "set PYTHON=/path/to/python3.10-or-later", file=sys.stderr)
    sys.exit(2)
pyver = f"{sys.version_info.major}.{sys.version_info.minor}"

# torch: the machine's own CUDA build
try:
    import torch
except Exception as e:  # noqa: BLE001
    need("torch with CUDA", f"torch does not import ({type(e).__name__}: {e}); install this machine's CUDA build "
         "of torch (and the torchvision built for it): pip download torch torchvision --index-url "
         "https://download.pytorch.org/whl/cu128 on a networked machine, or use cluster/Dockerfile's image")
else:
    if torch.version.cuda is None:
        need("torch with CUDA", f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch "
             "(https://download.pytorch.org/whl/cuXXX) and its torchvision")
    elif not torch.cuda.is_available():
        vis = os.environ.get("CUDA_VISIBLE_DEVICES")
        need("a CUDA GPU visible to torch", f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA "
             "device: no GPU, no NVIDIA driver, or a driver older than CUDA " + str(torch.version.cuda)
             + (f"; CUDA_VISIBLE_DEVICES={vis!r} hides them" if vis is not None else "")
             + (f"; nvidia-smi is {'at ' + shutil.which('nvidia-smi') if shutil.which('nvidia-smi') else 'absent'}"))
    else:
        print(f"ok: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)} "
              f"(compute capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))})")
    try:
        import torchvision  # noqa: F401  (timm imports it)
    except Exception as e:  # noqa: BLE001
        need("torchvision", f"it does not import ({type(e).__name__}: {e}); install the torchvision built for "
             f"torch {getattr(torch, '__version__', '?')}", None)

# ray==2.60.0 and its parts
try:
    import ray
except Exception as e:  # noqa: BLE001
    need("ray==2.60.0", f"ray does not import ({type(e).__name__}: {e})", "ray[data,train,tune,default]==2.60.0")
else:
    if ray.__version__ != "2.60.0":
        need("ray==2.60.0", f"ray {ray.__version__} is installed; this project is tested with 2.60.0",
             "ray[data,train,tune,default]==2.60.0")
    for part in ("ray.data", "ray.train.torch", "ray.tune"):
        try:
            importlib.import_module(part)
        except Exception as e:  # noqa: BLE001
            need(f"{part} (ray's extras)", f"{part} does not import ({type(e).__name__}: {e})",
                 "ray[data,train,tune,default]==2.60.0")
    if ray.__version__ == "2.60.0":
        print(f"ok: ray {ray.__version__}")

# the project's other dependencies, read from pyproject.toml (torch and torchvision: the machine's own)
text = open("pyproject.toml").read()
block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.S | re.M)
reqs = re.findall(r'"([^"]+)"', block.group(1)) if block else []
reqs.append("pytest>=8")
try:
    from packaging.requirements import Requirement
except ImportError:  # packaging comes with pip; without it only presence is checked
    Requirement = None
from importlib import metadata

for spec in reqs:
    name = re.split(r"[\[<>=!~; ]", spec, 1)[0]
    if name in ("torch", "torchvision", "ray"):
        continue
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        need(spec, "not installed", spec)
        continue
    if Requirement is not None and have not in Requirement(spec).specifier:
        need(spec, f"{name} {have} is installed", spec)

# asvp_ray from this checkout (its import fails too while a dependency above is missing)
try:
    importlib.import_module("asvp_ray.cli")
    print("ok: asvp_ray imports from", os.getcwd())
except Exception as e:  # noqa: BLE001
    need("asvp_ray", f"asvp_ray.cli does not import from {os.getcwd()} ({type(e).__name__}: {e})")

# Fashion-MNIST (bench/extract.py and examples/smoke.yaml read it)
try:
    from asvp_ray.data.fashion_mnist import FILES, find_root

    print(f"ok: Fashion-MNIST in {find_root()}")
except ImportError:
    pass  # reported above (a dependency of asvp_ray is missing)
except Exception as e:  # noqa: BLE001
    need("the Fashion-MNIST IDX files", f"{e}\n    This machine has no network: copy the four files "
         f"({', '.join(FILES)}; 30 MB, e.g. from /usr/share/datasets/fashion-mnist of a machine with Debian's "
         "dataset-fashion-mnist package, or `python -m asvp_ray.data.fashion_mnist ensure` on a networked "
         "machine) into a folder here and export ASVP_FASHION_MNIST=that/folder")

if not shutil.which("nvidia-smi"):
    warnings.append("nvidia-smi is not on PATH: GPU utilisation and memory will not be recorded")
if os.path.exists("/tmp/ray/ray_current_cluster") and not os.environ.get("RAY_ADDRESS"):
    addr = open("/tmp/ray/ray_current_cluster").read().strip()
    warnings.append(f"/tmp/ray/ray_current_cluster names a cluster at {addr} (a `ray start` on this machine): "
                    "bench/extract.py and asvp-ray join it instead of starting their own; if none runs there, "
                    "`ray stop` or remove the file, or they wait for it until their time limit")

for w in warnings:
    print(f"warning: {w}")
if missing:
    print("\nMISSING (nothing was run):", file=sys.stderr)
    for what, how in missing:
        print(f"  - {what}: {how}", file=sys.stderr)
    if to_download:
        arch = os.uname().machine
        reqs_q = " ".join(f"'{r}'" for r in dict.fromkeys(to_download))
        print(f"""
How to get the missing packages here (this machine has no network):
  1. On a machine with network, for this machine's Python {pyver} on {arch}:
       pip download -d wheelhouse --only-binary=:all: --python-version {pyver} --implementation cp \\
         --platform manylinux_2_28_{arch} --platform manylinux2014_{arch} {reqs_q}
     then delete torch-*, triton-* and nvidia-* wheels from wheelhouse/ (this machine keeps its own
     CUDA build of torch).
  2. Bring wheelhouse/ here. Ray's wheel alone is larger than 64 MiB, so a small file carry is not
     enough: copy it (scp/rsync), mount it from shared storage, or run in the image that
     cluster/Dockerfile builds (it has everything, Fashion-MNIST included).
  3. Here: {sys.executable} -m pip install --no-index --find-links wheelhouse {reqs_q}
  4. Rerun: bash bench/gpu_smoke.sh --preflight-only""", file=sys.stderr)
    sys.exit(2)
print("preflight: everything needed is here")
PYEOF
rc=$?
if (( rc != 0 )) && [[ "${GPU_SMOKE_FORCE:-0}" == 1 && $PREFLIGHT_ONLY == 0 ]]; then
  echo "GPU_SMOKE_FORCE=1: running the stages anyway (a check of this script; its figures are not GPU figures)"
elif (( rc != 0 )); then
  exit "$rc"
fi
if (( PREFLIGHT_ONLY )); then exit 0; fi

# --------------------------------------------------------------------------- stages
OUT_DIR=${1:-${OUT:-}}
[[ -z "$OUT_DIR" ]] && OUT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_smoke.XXXXXX")
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
STAGES=$OUT_DIR/stages.tsv
: > "$STAGES"
DEADLINE=$(( $(date +%s) + 465 ))   # 7 3/4 minutes for the stages, the rest for the summary

SMI_PID=
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 \
    > "$OUT_DIR/nvidia_smi.csv" 2> "$OUT_DIR/nvidia_smi.err" &
  SMI_PID=$!
fi
stop_smi() { if [[ -n "$SMI_PID" ]]; then kill "$SMI_PID" 2>/dev/null; wait "$SMI_PID" 2>/dev/null; SMI_PID=; fi; }
trap stop_smi EXIT

stage() {  # stage NAME LIMIT_S LOG CMD...
  local name=$1 limit=$2 log=$3; shift 3
  local left=$(( DEADLINE - $(date +%s) ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then
    echo "== $name: skipped, the 8-minute budget is spent"
    printf '%s\t%s\t%s\t%s\n' "$name" "$(date +%s.%N)" "$(date +%s.%N)" "skipped" >> "$STAGES"
    return
  fi
  echo "== $name (at most ${limit}s): $*"
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout --kill-after=15 "$limit" "$@" > "$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  printf '%s\t%s\t%s\t%s\n' "$name" "$t0" "$t1" "$rc" >> "$STAGES"
  echo "   exit $rc after $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f", b-a}')s (124: time limit); log $log"
}

stage tests "${GPU_SMOKE_TESTS_S:-210}" "$OUT_DIR/tests.log" \
  "$PY" -m pytest -q -s -rA -p no:cacheprovider tests/test_gpu.py
stage extract "${GPU_SMOKE_EXTRACT_S:-90}" "$OUT_DIR/extract.log" \
  "$PY" bench/extract.py --images "${GPU_SMOKE_IMAGES:-10000}" --repeat 2 --warmup 1
# shellcheck disable=SC2086  # GPU_SMOKE_RUN_SET holds several --set arguments
stage run "${GPU_SMOKE_RUN_S:-150}" "$OUT_DIR/run_console.log" \
  "$PY" -m asvp_ray.cli run examples/smoke.yaml --out "$OUT_DIR/run" \
  --set method=asvp --set extract.device=cuda --set train.use_gpu=true \
  --set refresh.policy=every_round --set 'budget.schedule=[40,40]' ${GPU_SMOKE_RUN_SET:-}
stop_smi

# --------------------------------------------------------------------------- results
"$PY" - "$OUT_DIR" <<'PYEOF'
import csv
import json
import re
import statistics
import sys
from datetime import datetime
from pathlib import Path

out = Path(sys.argv[1])
res = {"out_dir": str(out), "stages": {}}
try:
    import ray
    import torch

    res["torch"], res["ray"] = torch.__version__, ray.__version__
    if torch.cuda.is_available():
        res["gpu"] = torch.cuda.get_device_name(0)
        res["capability"] = list(torch.cuda.get_device_capability(0))
except Exception as e:  # noqa: BLE001
    res["versions_error"] = str(e)

samples = []
smi = out / "nvidia_smi.csv"
if smi.exists():
    for row in csv.reader(smi.open()):
        try:
            t = datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((t, float(row[1]), float(row[2])))
        except (ValueError, IndexError):
            pass
for line in (out / "stages.tsv").read_text().splitlines():
    name, t0, t1, rc = line.split("\t")
    t0, t1 = float(t0), float(t1)
    st = {"exit": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": round(t1 - t0, 1)}
    mine = [s for s in samples if t0 <= s[0] <= t1]
    if mine:
        util = [s[1] for s in mine]
        st["gpu_util_pct"] = {"mean": round(statistics.mean(util), 1), "max": max(util),
                              "samples": len(util), "busy_samples": sum(u > 0 for u in util)}
        st["gpu_mem_used_mb_max"] = max(s[2] for s in mine)
    res["stages"][name] = st

log = out / "tests.log"
if log.exists():
    text = log.read_text(errors="replace")
    tail = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    res["tests"] = {"summary": tail[-1].strip("= ") if tail else None,
                    "failed": re.findall(r"^(?:FAILED|ERROR) tests/test_gpu\.py::(\S+)", text, re.M),
                    "skipped": re.findall(r"^SKIPPED \[\d+\] (tests/test_gpu\.py:\d+: .*)$", text, re.M),
                    "finetune_epoch": [ln.strip() for ln in text.splitlines() if re.match(r"\s*augment=\w+: loss", ln)],
                    "extraction_error": [ln.strip() for ln in text.splitlines() if "relative error median" in ln]}
    # one CUDA fine-tuning epoch of 512 images (test_one_cuda_finetune_epoch_lowers_the_loss): seconds
    for ln in res["tests"]["finetune_epoch"]:
        m = re.search(r"augment=(\w+):.* ([\d,]+) img/s", ln)
        if m:
            rate = float(m.group(2).replace(",", ""))
            res.setdefault("finetune_epoch_train_s_512_images", {})[f"augment={m.group(1)}"] = round(512 / rate, 2)

log = out / "extract.log"
if log.exists():
    text = log.read_text(errors="replace")
    ray_runs = [{k: float(v.replace(",", "")) for k, v in
                 re.findall(r"(steady|model calls) +([\d,]+) img/s", ln)} for ln in text.splitlines()
                if re.match(r"run \d+ ray", ln)]
    plain_runs = [float(m.group(1).replace(",", "")) for m in re.finditer(r"^run \d+ plain.*steady +([\d,]+) img/s",
                                                                             text, re.M)]
    plan = re.search(r"^actor plan: (.*)$", text, re.M)
    res["extraction"] = {
        "ray_steady_img_s": [r.get("steady") for r in ray_runs],
        "ray_model_calls_img_s": [r.get("model calls") for r in ray_runs],
        "plain_cpu_loop_steady_img_s": plain_runs,
        "actor_plan": plan.group(1) if plan else None,
        "on_cuda": bool(plan and "'cuda'" in plan.group(1)),
    }

summ = out / "run" / "summary.json"
if summ.exists():
    s = json.loads(summ.read_text())
    run = {"status": s.get("status"), "rounds": len(s.get("rounds", []))}
    refreshes = [r["refresh"] for r in s.get("rounds", []) if r.get("refresh")]
    per_epoch = []
    for r in refreshes:
        try:
            import torch

            epochs = int(torch.load(r["checkpoint"], map_location="cpu", weights_only=False)["epochs"])
            per_epoch.append(round(r["finetune_seconds"] / max(epochs, 1), 2))
        except Exception:  # noqa: BLE001
            pass
    run["refresh_finetune_s"] = [r.get("finetune_seconds") for r in refreshes]
    run["refresh_extract_s"] = [r.get("extract_seconds") for r in refreshes]
    run["finetune_wall_s_per_epoch_incl_startup"] = per_epoch
    metas = sorted((out / "run" / "features").glob("v*/meta.json"))
    run["feature_versions"] = [{k: json.loads(m.read_text()).get(k) for k in ("version", "device", "precision", "gpu")}
                               for m in metas]
    run["final"] = {k: (s.get("final") or {}).get(k) for k in ("training_method", "test_accuracy", "seconds")}
    res["asvp_run"] = run

(out / "gpu_smoke.json").write_text(json.dumps(res, indent=2))
print(json.dumps(res, indent=2))
print(f"\nresults: {out / 'gpu_smoke.json'}")
failed = [n for n, st in res["stages"].items() if st["exit"] != 0]
if failed:
    print(f"stages that failed or ran out of time: {', '.join(failed)} (see their logs in {out})")
sys.exit(1 if failed else 0)
PYEOF
