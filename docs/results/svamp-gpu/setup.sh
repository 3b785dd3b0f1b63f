# device call 1 (from the repo root, .gpu carried): wheels, the first part of the student's GGUF,
# the SVAMP files and PaLM annotations; try CUDA MPS (several processes' kernels at once) with two
# concurrent smoke trainings, and keep it only if both pass.
set -e
mkdir -p /tmp/m && cp .gpu/part1 /tmp/m/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
mkdir -p ../shared/data/sbs && cp -r .gpu/sbs/svamp ../shared/data/sbs/
# offline: never kernelize from the hub (transformers 5.25 turns it on for this model on CUDA)
cat > /tmp/site/sitecustomize.py <<'PY'
import torch.nn
_train = torch.nn.Module.train
def train(self, mode=True):
    if getattr(self, "_use_kernels", False):
        self._use_kernels = False
    return _train(self, mode)
torch.nn.Module.train = train
PY
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests STEPDISTILL_HOME=/tmp/home TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 -c "import torch, transformers, peft, accelerate, pydantic, gguf, stepdistill; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
python3 -m stepdistill.cli annotate --task svamp --data ../shared/data/sbs --split train --teacher paper --out runs/palm-svamp-train | tail -2
set +e
M=$(command -v nvidia-cuda-mps-control || ls /usr/local/nvidia/bin/nvidia-cuda-mps-control 2>/dev/null)
echo "mps control: ${M:-none}"
[ -n "$M" ] && $M -d && echo "mps daemon started"
(timeout 150 python3 docs/results/svamp-gpu/smoke.py > /tmp/smoke1.log 2>&1; echo $? > /tmp/smoke1.rc) &
(timeout 150 python3 docs/results/svamp-gpu/smoke.py > /tmp/smoke2.log 2>&1; echo $? > /tmp/smoke2.rc) &
wait
tail -7 /tmp/smoke1.log; tail -2 /tmp/smoke2.log
if [ "$(cat /tmp/smoke1.rc)$(cat /tmp/smoke2.rc)" = "00" ]; then
  [ -n "$M" ] && touch /tmp/mps_ok; echo "SMOKE OK (mps: ${M:+on})"
else
  [ -n "$M" ] && echo quit | $M; echo "SMOKE FAILED"
fi
nvidia-smi --query-gpu=name,memory.used --format=csv; df -h /tmp . | tail -2
