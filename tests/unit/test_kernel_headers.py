"""scripts/kernel-headers.sh (the agent's init container, and make setup) on made-up trees.

A fake /lib/modules and /usr/src under a temporary directory, the script run as the image runs
it: it links Debian's split trees, picks the newest, leaves a real build directory and foreign
files alone, is idempotent, and fails naming what is missing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "kernel-headers.sh"
KREL = "9.9.9-node"


def headers(src: Path, version: str) -> None:
    arch, common = src / f"linux-headers-{version}-amd64", src / f"linux-headers-{version}-common"
    (arch / "include" / "generated").mkdir(parents=True)
    (arch / "include" / "generated" / "autoconf.h").touch()
    (common / "include" / "linux").mkdir(parents=True)
    (common / "include" / "linux" / "kconfig.h").touch()


def run(root: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KREL": KREL,
        "MODULES_ROOT": str(root / "modules"),
        "HEADERS_ROOT": str(root / "src"),
        "KHEADERS": str(root / "kheaders.tar.xz"),  # CONFIG_IKHEADERS when it exists
    }
    return subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, check=False)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    return tmp_path


def test_links_the_newest_split_tree_idempotently(root: Path) -> None:
    for version in ("6.1.0-9", "6.1.0-56"):
        headers(root / "src", version)
    assert run(root).returncode == 0
    moddir = root / "modules" / KREL
    assert os.readlink(moddir / "build") == str(root / "src" / "linux-headers-6.1.0-56-amd64")
    assert os.readlink(moddir / "source") == str(root / "src" / "linux-headers-6.1.0-56-common")
    again = run(root)
    assert again.returncode == 0 and "linked" not in again.stderr


def test_a_real_build_directory_and_foreign_files_stay(root: Path) -> None:
    headers(root / "src", "6.1.0-56")
    moddir = root / "modules" / KREL
    (moddir / "build" / "include" / "generated").mkdir(parents=True)
    (moddir / "build" / "include" / "generated" / "autoconf.h").touch()
    (moddir / "build" / "include" / "linux").mkdir()
    (moddir / "build" / "include" / "linux" / "kconfig.h").touch()
    assert run(root).returncode == 0
    assert not (moddir / "build").is_symlink() and not (moddir / "source").exists()
    (moddir / "build").rename(moddir / "elsewhere")
    (moddir / "source").write_text("not ours")
    result = run(root)
    assert (moddir / "source").read_text() == "not ours"
    assert (moddir / "build").is_symlink()
    # the kept file hides the -common tree: kconfig.h is missing, and it says so
    assert result.returncode == 1 and "kconfig.h missing" in result.stderr


def test_no_headers_fails_naming_what_is_missing_unless_the_kernel_has_them(root: Path) -> None:
    result = run(root)
    assert result.returncode == 1
    assert "linux-headers-*-amd64" in result.stderr and KREL in result.stderr
    (root / "kheaders.tar.xz").touch()
    assert run(root).returncode == 0
    assert not (root / "modules" / KREL).exists()
