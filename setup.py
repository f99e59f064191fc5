"""Install megapico: `pip install -e .[test]` (scripts/ensure_venv.sh does this in ./.venv)."""

from setuptools import find_packages, setup

setup(
    name="megapico",
    license="Apache-2.0",
    version="0.1.0",
    description="Megatron/DeepSpeed-style tensor-parallel + ZeRO-2 pretraining for the pico-decoder models",
    packages=find_packages(include=["megapico", "megapico.*"]),
    package_data={"megapico.convert": ["pico_decoder_hf.py"]},
    python_requires=">=3.10",
    install_requires=[
        # Pinned: on a CPU machine this resolves to the local CPU wheel, on a GPU machine to the CUDA build.
        "torch==2.13.0",
        "deepspeed==0.19.8",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "tiktoken>=0.7,<1",  # exact, faster encoder for byte-level BPE files (megapico/data/bytelevel_bpe.py)
        "transformers>=5.0",  # huggingface_hub >= 1.0 (publishing) needs transformers 5
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "wandb>=0.18",
        "omegaconf>=2.3",
        "tqdm>=4.66",
        "numpy>=1.26",
        "pyarrow>=15",
        "zstandard>=0.22",
        "psutil>=5.9",
        "matplotlib>=3.8",  # tools/plot_run.py
        "msgspec>=0.18",  # preprocess: JSON lines parsed keeping only --json-keys (~8x json.loads)
        "isal>=1.0",  # preprocess: gzip inflated by ISA-L (~3x zlib)
        "fsspec>=2023.1",  # preprocess --input URLs (s3:// also needs s3fs; hf:// comes with huggingface_hub)
        # the build as tasks on many machines (megapico/data/build_tasks.py subclasses two of its executors)
        "datatrove>=0.10.1,<0.11",
    ],
    extras_require={"ray": ["ray>=2.60"], "test": ["pytest>=8", "ruff>=0.6", "ray>=2.60"]},
)
