from setuptools import find_packages, setup

setup(
    name="fairseq_moec",
    version="0.1.0",
    description="Mixture of Expert Clusters (MoEC) Transformers for machine translation: a fairseq user-dir plugin",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["fairseq_moec", "fairseq_moec.*"]),
    # fairseq itself (fairseq-fixed==0.12.3.1) is installed by scripts/bootstrap.sh with --no-deps: its
    # metadata declares torchaudio, which would replace the CPU torch by a CUDA build.
    install_requires=["torch>=2.6", "sacrebleu>=2.4", "sentencepiece>=0.2", "hydra-core>=1.3,<1.4"],
    entry_points={"console_scripts": ["fairseq-moec-hydra-train = fairseq_moec.hydra_train:main"]},
    # the benchmark peers (fairscale, torchscale) are not an extra: their metadata cannot be installed with this
    # torch; benchmarks/install_peers.sh installs them without their declared dependencies
)
