"""The README's walkthrough ("## Using it") runs exactly as written, against a real hub.

Its bash block is taken from README.md as it stands and run with `bash -euo pipefail` in an
empty directory, with the venv's `entremise` first on PATH and no ENTREMISE_* variable
inherited: what a new user gets by saving it as a script. The block starts its own hub on the
README's address (127.0.0.1:50051), so the test skips, saying so, when that port is taken.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HOST, PORT = "127.0.0.1", 50051
#: The walkthrough takes under a minute; a loaded 2-core CI machine gets a generous margin.
TIMEOUT_S = 240.0


def walkthrough() -> str:
    """The first bash block of the README's "## Using it" section."""
    text = README.read_text(encoding="utf-8")
    assert "\n## Using it\n" in text, "README.md has no '## Using it' section"
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
    assert match, "the '## Using it' section of README.md has no bash block"
    return match.group(1)


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - the pgid was reused by someone else's process
        return False
    return True


def _stop_group(pgid: int) -> None:
    """Stop whatever the block left running in its own process group (a hub it did not stop)."""
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        if not _group_alive(pgid):
            return
        os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)


def _environment() -> dict[str, str]:
    """A user's shell: the venv's commands first on PATH, no ENTREMISE_* setting inherited."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ENTREMISE_") and k not in ("FORCE_COLOR", "COLUMNS", "LINES")
    }
    bin_dir = Path(sys.executable).parent
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    # A fixed width and encoding, so that Rich's tables and wrapping do not depend on a terminal.
    env.update({"COLUMNS": "120", "NO_COLOR": "1", "PYTHONIOENCODING": "utf-8"})
    return env


def test_the_walkthrough_names_the_hub_address_the_test_checks() -> None:
    script = walkthrough()
    assert f"--listen {HOST}:{PORT}" in script
    assert f"ENTREMISE_TARGET={HOST}:{PORT}" in script
    # Nothing in it is a placeholder to fill in by hand.
    for placeholder in ("ag_...", "pr_", "...same"):
        assert placeholder not in script, placeholder


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    script = walkthrough()
    if shutil.which("bash") is None:
        pytest.skip("no bash on this machine")
    if not (Path(sys.executable).parent / "entremise").exists():
        pytest.fail(f"no `entremise` command beside {sys.executable}: is the package installed?")
    if _port_taken(HOST, PORT):
        pytest.skip(f"{HOST}:{PORT} is in use, and the README's walkthrough starts its hub there")

    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "walkthrough.sh").write_text(script, encoding="utf-8")
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    started = time.monotonic()
    # Files, not pipes: a hub left running would hold a pipe open past the script's end. The
    # block runs in its own session, so whatever it leaves behind is stopped by its group id.
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(
            ["bash", "-euo", "pipefail", str(tmp_path / "walkthrough.sh")],
            cwd=work,
            env=_environment(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            left_running = _group_alive(proc.pid)
            _stop_group(proc.pid)
            if proc.poll() is None:
                proc.wait()
    elapsed = time.monotonic() - started
    stdout = out_path.read_text(encoding="utf-8")
    stderr = err_path.read_text(encoding="utf-8")
    report = f"after {elapsed:.0f} s\n--- stdout:\n{stdout[-6000:]}\n--- stderr:\n{stderr[-4000:]}"

    assert code is not None, f"the walkthrough did not finish within {TIMEOUT_S:.0f} s {report}"
    assert code == 0, f"the walkthrough exited {code} {report}"
    assert not left_running, f"the walkthrough left a process running (its hub?) {report}"
    assert "Traceback" not in stderr, report
    assert not _port_taken(HOST, PORT), f"the hub still answers after the walkthrough {report}"

    flat = " ".join(stdout.split())  # Rich wraps long lines at the terminal width
    # The agreement id captured with --quiet reached every later command.
    agreement = re.search(r"agreement (ag_\w+): active", flat)
    assert agreement, report
    assert f"withdraw in {agreement[1]}: received 10, matched 10" in flat, report
    assert f"erase in {agreement[1]}: received 10, rows_erased 10" in flat, report
    # Both uploads, a release, the budget it spent, and a Bounds: note for the cut count.
    assert re.search(r"'bank' v1: [\d,]+ rows", flat), report
    assert re.search(r"'panel' v1: [\d,]+ rows", flat), report
    assert re.search(r"release rel_\w+: spent epsilon 1, remaining 3\b", flat), report
    assert "Bounds" in flat, report
    assert "at most 1 group of the 6 groups of panel.category" in flat, report
    assert (work / "report" / "report.html").is_file(), report
    assert re.search(r"audit log intact: \d+ entries verified", flat), report
