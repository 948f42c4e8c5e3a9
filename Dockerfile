# dist_coop on a CUDA PyTorch image: deepspeed, torchrun and the dist-coop CLI inside.
#   docker build -t dist_coop .
#   docker run --gpus all --rm -it dist_coop deepspeed --num_gpus 1 launch/train.py \
#       --config configs/quickstart.yaml --dist.engine=deepspeed --dist.zero_stage=2 --optim.amp=bf16
# The devel flavour carries nvcc, which DeepSpeed needs to JIT-compile its CUDA ops on first use.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# ffmpeg for video shards; the bundled dataset where the distribution packages it (Debian, Ubuntu universe);
# pdsh/openssh for the multi-node deepspeed launcher
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg pdsh openssh-client \
 && (apt-get install -y --no-install-recommends dataset-fashion-mnist || echo "dataset-fashion-mnist not packaged here: mount it and pass --data.root") \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/dist_coop
COPY pyproject.toml README.md ./
COPY dist_coop ./dist_coop
# the image's torch already satisfies the project's torch range, so pip keeps it
RUN pip install -e ".[test]" && python -c "import deepspeed, dist_coop; print('deepspeed', deepspeed.__version__)"
COPY launch ./launch
COPY configs ./configs
COPY benchmarks ./benchmarks
COPY tests ./tests

CMD ["dist-coop", "--help"]
