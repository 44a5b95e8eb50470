"""The installed package: tempo_ds.kernels comes from kernels/ and never shadows a module named `kernels`."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_is_a_subpackage_of_tempo_ds():
    import tempo_ds.kernels

    assert Path(tempo_ds.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
                    "-w", str(out), str(ROOT)], check=True, cwd=out)
    (path,) = out.glob("tempo_ds-*.whl")
    return path


def test_wheel_installs_no_top_level_kernels(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    assert top == {"tempo_ds", "tempo_ds.pth"}  # tempo_ds.pth: tempo_ds.run's start-up hook, at site-packages' top
    assert "tempo_ds/kernels/__init__.py" in names
    assert "tempo_ds/data/shakespeare.txt.gz" in names
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["tempo_ds"]


def test_installed_wheel_leaves_another_kernels_module_importable(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)          # a wheel is installed by unpacking it
    other = tmp_path / "other"
    (other / "kernels").mkdir(parents=True)
    (other / "kernels" / "__init__.py").write_text("WHO = 'the other kernels package'\n")
    code = ("import kernels, tempo_ds.kernels as tk; "
            "print(kernels.WHO); print(tk.__name__, tk.__file__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(other)])}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    first, second = run.stdout.splitlines()
    assert first == "the other kernels package"
    assert second.startswith("tempo_ds.kernels ") and str(site) in second
