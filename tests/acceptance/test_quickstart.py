"""The quickstart as a reader follows it: a fresh virtualenv, ``pip install .`` from a
checkout, the two files of the page, the caller run, then ``celery worker``."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from celery_unique.testing import RedisServer, wait_for

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "quickstart"


def checkout(to: Path) -> Path:
    """The repository's tracked files, as a clone has them (nothing built in this tree)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, to / name)
    return to


def printed(prefix: str) -> list[str]:
    """The page's console line that starts with ``prefix``, split as a shell would."""
    page = (ROOT / "docs" / "quickstart.rst").read_text()
    [line] = [line.strip().removeprefix("$ ") for line in page.splitlines()
              if line.strip().removeprefix("$ ").startswith(prefix)]
    return shlex.split(line.split("#")[0])


def test_the_quickstart_as_printed(tmp_path: Path, unique_redis_server: RedisServer) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python, celery = env_dir / "bin" / "python", env_dir / "bin" / "celery"
    source = checkout(tmp_path / "celery-unique")
    install = printed("python -m pip install")
    assert install == ["python", "-m", "pip", "install", "."]
    subprocess.run([str(python), *install[1:], "-q"], cwd=source, check=True,
                   capture_output=True, timeout=600)
    project = tmp_path / "project"
    project.mkdir()
    for name in ("tasks.py", "caller.py"):
        shutil.copy(EXAMPLE / name, project / name)
    env = {"PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "HOME": str(tmp_path), "BROKER_URL": f"{unique_redis_server.url}/9"}

    assert printed("python caller.py") == ["python", "caller.py"]
    called = subprocess.run([str(python), "caller.py"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=60)
    assert called.returncode == 0, called.stderr
    assert called.stdout.startswith("already queued: "), called.stdout
    assert "report_alice@example.com}, 3600 s left" in called.stdout

    log = project / "worker.log"
    worker = subprocess.Popen(
        [str(celery), *printed("celery -A tasks worker")[1:], f"--logfile={log}"],
        cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        alphabet = project / "alphabet.txt"
        wait_for(lambda: alphabet.exists() and len(alphabet.read_text()) == 6, timeout=60,
                 what="the six letters")
        wait_for(lambda: log.read_text().count("report sent to") == 2, timeout=30,
                 what="the two reports")
        assert alphabet.read_text() == "abcdef"
        text = log.read_text()
        assert "report sent to alice@example.com" in text
        assert "report sent to bob@example.com" in text
        assert "Traceback" not in text and "ERROR" not in text, text
    finally:
        worker.terminate()
        worker.wait(30)
