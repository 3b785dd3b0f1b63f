# device call 1: the wheels, half the student's GGUF and SVAMP into /tmp; a smoke test on CUDA
set -e
mkdir -p /tmp/m /tmp/sbs && cp .gpu/part1 /tmp/m/ && cp -r .gpu/sbs/svamp /tmp/sbs/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests STEPDISTILL_HOME=/tmp/home TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, peft, accelerate, pydantic, gguf, stepdistill; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
echo setup done
nvidia-smi --query-gpu=name,memory.used --format=csv
