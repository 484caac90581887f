#!/usr/bin/env bash
# The zoo's packages (tests/zoo): third-party model definitions, into the active environment.
#
# Not a pyproject extra: transformers 5.25 requires `kernels>=0.19.1,<0.20`, which the package
# index this project installs from does not have, so `pip install transformers` fails to
# resolve. The definitions are therefore installed without dependency resolution (--no-deps),
# and the small pure-Python packages they import beside them, resolved normally. torch is held
# at the installed version by a constraint, so nothing here can replace it (another torch spec
# would pull a 5 GB CUDA build).
set -euo pipefail
torch_version=$(python -c "import torch; print(torch.__version__.split('+')[0])")
constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
echo "torch==${torch_version}" > "$constraint"

pip install --quiet -c "$constraint" \
    "huggingface-hub>=2.4,<3" "tokenizers>=0.23.1,<0.24" "safetensors>=0.8" \
    "regex>=2025.10.22" "pyyaml>=5.1" "packaging>=20" "tqdm>=4.60" "numpy>=1.24" typer
pip install --quiet --no-deps -c "$constraint" transformers==5.25.0 efficientnet_pytorch==0.7.1

python -c "import torch, transformers, efficientnet_pytorch; \
assert torch.__version__.split('+')[0] == '${torch_version}', torch.__version__; \
print('zoo packages: transformers', transformers.__version__, 'efficientnet_pytorch 0.7.1,', \
'torch', torch.__version__)"
