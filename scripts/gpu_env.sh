# Source on a GPU machine whose image has torch/triton/transformers but no package index:
#   bash <path>/wheels.sh .whl          # here, beforehand: the other dependencies as wheels
#   source scripts/gpu_env.sh           # there: installs them to /tmp/site, the project in
#                                       # editable mode, and sets the environment
# Afterwards `make test-gpu` and `bash scripts/acceptance.sh` run with the image's python3.
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
PATH=$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
# DeepSpeed's op builder cannot parse the image's "9.0a"; unbuffered output for logs
export PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
# never NVLink multicast (a program using it can take a shared host's GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 - <<'PY'
from importlib.metadata import PackageNotFoundError, version
import torch
versions = []
for n in ("torch", "triton", "transformers", "deepspeed", "liger-kernel", "hydra-core"):
    try:
        versions.append(f"{n} {version(n)}")
    except PackageNotFoundError:
        versions.append(f"{n} missing")
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"{gpu}; " + ", ".join(versions))
PY
