"""Packaging: the wheel carries the shipped assets (tokenizer, embedded classifier, the
MedSafetyWorld templates), and neither the wheel nor the editable install warns."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = sorted(str(p.relative_to(REPO)) for p in (REPO / "megatron_srp" / "assets").rglob("*")
                if p.is_file())
# Warnings that setuptools raises about the project's configuration (not pip's own notes).
SETUPTOOLS_WARNING = re.compile(r"\w*Warning: |is absent from the `packages`")


def _source_copy(tmp_path: Path) -> Path:
    """The files a build reads, copied so that the build leaves nothing in the checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "megatron_srp", src / "megatron_srp",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _build(src: Path, hook: str, out: Path) -> tuple[Path, str]:
    code = (f"import setuptools.build_meta as b; print(b.{hook}({str(out)!r}))")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=src,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = proc.stdout.strip().splitlines()[-1]
    return out / name, proc.stdout + proc.stderr


def test_the_wheel_carries_the_assets_and_the_build_does_not_warn(tmp_path: Path) -> None:
    assert ASSETS, "no assets found under megatron_srp/assets"
    wheel, log = _build(_source_copy(tmp_path), "build_wheel", tmp_path / "dist")
    warnings = [line for line in log.splitlines() if SETUPTOOLS_WARNING.search(line)]
    assert not warnings, "\n".join(warnings[:10])
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [a for a in ASSETS if a not in names]
    assert not missing, f"the wheel lacks {missing}"
    assert "megatron_srp/units.py" in names
    assert not any("__pycache__" in n for n in names)


def test_the_editable_install_does_not_warn(tmp_path: Path) -> None:
    _, log = _build(_source_copy(tmp_path), "build_editable", tmp_path / "dist")
    warnings = [line for line in log.splitlines() if SETUPTOOLS_WARNING.search(line)]
    assert not warnings, "\n".join(warnings[:10])
