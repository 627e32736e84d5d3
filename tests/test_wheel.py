"""The wheel works without the checkout (issue 23): built from a copy of the sources (no
build isolation, nothing downloaded), installed into a fresh virtual environment that
borrows this environment's dependencies, and `cca-jax run tiny` run from another folder,
where the checkout is not importable."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _listed_packages() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^packages = \[(.*?)\]", text, re.S | re.M).group(1)
    return set(re.findall(r'"([\w.]+)"', block))


def test_every_package_directory_is_listed():
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "cca_jax").rglob("__init__.py")}
    found |= {".".join(p.relative_to(ROOT).parts) for p in (ROOT / "cca_jax").rglob("*")
              if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.json"))}
    assert found <= _listed_packages(), found - _listed_packages()
    assert {"cca_jax.configs", "cca_jax.configs.models"} <= _listed_packages()


def _run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: the build writes build/ and *.egg-info next to its sources
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    for d in ("cca_jax", "configs"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", src, "-w", tmp / "dist"])
    (whl,) = (tmp / "dist").glob("cca_jax-*.whl")
    return whl


def test_the_wheel_carries_configs_data_and_entry_points(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        eps = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    for want in ("cca_jax/configs/tiny.yaml", "cca_jax/configs/demo.yaml", "cca_jax/configs/gemma-2-2b-it.yaml",
                 "cca_jax/configs/models/tiny-llama.yaml", "cca_jax/data/builtin/9001.json"):
        assert want in names, want
    assert {f"cca_jax/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")} <= names
    assert "cca-jax = cca_jax.cli:main" in eps
    assert "[lm_eval.models]" in eps and "cca_jax = cca_jax.lm_eval_adapter:CCAJaxLM" in eps


def test_installed_wheel_runs_tiny_from_another_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # this environment's packages (jax, flax, ...) after the venv's own: nothing to download
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_cca_jax_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    where = _run([py, "-c", "import cca_jax, cca_jax.demo as d; print(cca_jax.__file__); print(d.config_path())"],
                 cwd=elsewhere, env=env).stdout.split()
    assert all(Path(w).is_relative_to(site) for w in where), where  # the wheel's, not the checkout's
    r = _run([venv / "bin" / "cca-jax", "run", "tiny", "--out", "runs/tiny", "--quiet", "--set", "dcm.epochs=1",
              "--set", "amplify.steps=1", "--set", "amplify.eval_steps=[1]"], cwd=elsewhere, env=env)
    assert "test accuracy before" in r.stdout and "circuit:" in r.stdout
    assert (elsewhere / "runs" / "tiny" / "summary.json").exists()
    r = _run([venv / "bin" / "cca-jax", "configs", "demo"], cwd=elsewhere, env=env)
    assert r.stdout == (ROOT / "configs" / "demo.yaml").read_text()
