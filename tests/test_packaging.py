"""What an installed spidr_fast holds and needs: a built wheel has every package (the editable install
of the checkout hides a missing one), and nothing but audio decoding needs soundfile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Imports every module of the installed spidr_fast, builds a tiny random SpidR and extracts from it.
# Prints the modules' files (one per line) after "MODULES".
IMPORT_ALL_AND_EXTRACT = r"""
import importlib, pkgutil, sys
import torch
import spidr_fast, spidr_fast.kernels
from spidr_fast import FeatureExtractor, SpidR
from spidr_fast.train.config import read_config

names = sorted(
    {m.name for m in pkgutil.walk_packages(spidr_fast.__path__, "spidr_fast.")}
    | {m.name for m in pkgutil.walk_packages(spidr_fast.kernels.__path__, "spidr_fast.kernels.")}
)
modules = [importlib.import_module(n) for n in names if n.rsplit(".", 1)[-1] != "__main__"]
torch.manual_seed(0)
model = SpidR(read_config("tiny").model)
out = FeatureExtractor(model, layers=[1, 2], device="cpu")([torch.randn(4000), torch.randn(8000)])
assert [o["layer2"].shape for o in out] == [(12, 32), (24, 32)], [o["layer2"].shape for o in out]
assert all(torch.isfinite(o["layer2"]).all() for o in out)
print("MODULES")
print("\n".join(m.__file__ for m in [spidr_fast, *modules]))
"""

NO_SOUNDFILE = "import sys\nsys.modules['soundfile'] = None  # `import soundfile` raises ImportError\n"


def run_python(code: str, *, cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_everything_but_decoding_works_without_soundfile(tmp_path: Path) -> None:
    decode = r"""
from spidr_fast.data.audio import load_audio
from spidr_fast.data.manifest import ManifestEntry
from spidr_fast.extraction.files import Input, read_audio
open("a.wav", "wb").write(b"RIFF")
calls = [lambda: load_audio(b"RIFF", name="a.wav"), lambda: read_audio(Input("a", ManifestEntry("a", "a.wav", -1)))]
for call in calls:
    try:
        call()
    except ImportError as e:  # not AudioError: a missing package is not an unreadable file
        print("DECODE", e)
    else:
        raise SystemExit("decoded without soundfile")
"""
    proc = run_python(NO_SOUNDFILE + IMPORT_ALL_AND_EXTRACT + decode, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("DECODE")]
    assert len(errors) == 2
    assert all("pip install soundfile" in line for line in errors), errors


def test_conftest_reports_the_real_import_error(tmp_path: Path) -> None:
    # A module missing at import (here one of spidr_fast's own, as a missing dependency would be): the
    # guard names it instead of claiming that spidr_fast is not installed. (One that spidr_fast.kernels
    # imports: the package's own public names are imported lazily, on first use.)
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['spidr_fast.kernels._dispatch'] = None\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_layering.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "spidr_fast.kernels._dispatch" in out and "not installed" not in out, out[-3000:]


def test_built_wheel_installs_and_extracts_outside_the_checkout(tmp_path: Path) -> None:
    # Build from a copy of the sources (no build/ or egg-info left in the checkout), no C++ extension.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, src / name)
    for name in ("spidr_fast", "kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    env = {**os.environ, "SPIDR_FAST_SKIP_EXT": "1"}
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)]
    subprocess.run(build, env=env, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("spidr_fast-*.whl")
    site = tmp_path / "site"
    install = [*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = run_python(IMPORT_ALL_AND_EXTRACT, cwd=cwd, pythonpath=str(site))
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = proc.stdout.split("MODULES\n", 1)[1].split()
    assert all(Path(f).is_relative_to(site) for f in files), [f for f in files if not Path(f).is_relative_to(site)]
    installed = {Path(f).relative_to(site / "spidr_fast").as_posix() for f in files}
    expected = {p.relative_to(ROOT / "spidr_fast").as_posix() for p in (ROOT / "spidr_fast").rglob("*.py")} | {
        f"kernels/{p.relative_to(ROOT / 'kernels').as_posix()}" for p in (ROOT / "kernels").rglob("*.py")
    }
    main_modules = {p for p in expected if p.endswith("__main__.py")}  # not imported: they run a command
    assert installed == expected - main_modules
