"""A real headless Chromium (Debian's `chromium`, which `scripts/setup` installs), for the
tests of pages the supervisor writes: the DOM after loading, and a screenshot. Each run
gets a throwaway profile under the caller's temp dir, so nothing is left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def _chromium(page: Path, work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is missing: scripts/setup installs Debian's chromium package"
    profile = work / "chromium-profile"
    home = work / "chromium-home"  # it writes under $HOME whatever the profile dir says
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
    }
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--disable-extensions",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=work,
        env=env,
    )


def dump_dom(page: Path, work: Path) -> str:
    """The page's DOM as the browser built it."""
    done = _chromium(page, work, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def screenshot(page: Path, work: Path, out: Path, size: tuple[int, int] = (1280, 1500)) -> Path:
    done = _chromium(page, work, f"--screenshot={out}", f"--window-size={size[0]},{size[1]}")
    assert done.returncode == 0 and out.exists(), done.stderr[-2000:]
    return out
