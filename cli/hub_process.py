"""A hub in its own process (`entremise serve`), as it runs in production.

The demo, the load and crash benchmarks and the shutdown test start hubs this way: a port
file says when it listens, a log file keeps what it said, SIGTERM stops it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


class HubProcess:
    """`entremise serve` on a free loopback port over `hub_dir`, with extra `serve` options."""

    def __init__(self, hub_dir: Path, admin_token: str, options: Sequence[str] = ()) -> None:
        hub_dir.mkdir(parents=True, exist_ok=True)
        port_file = hub_dir / "hub.port"
        port_file.unlink(missing_ok=True)
        self.log = hub_dir / "hub.log"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "entremise.cli",
                "serve",
                "--data-dir",
                str(hub_dir),
                "--listen",
                "127.0.0.1:0",
                "--port-file",
                str(port_file),
                "--log-file",
                str(self.log),
                *options,
            ],
            env={**os.environ, "ENTREMISE_ADMIN_TOKEN": admin_token},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"hub exited early: {err.strip().splitlines()[-1:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("hub did not start within 60 s")
            time.sleep(0.05)
        self.target = f"127.0.0.1:{int(port_file.read_text())}"

    @property
    def pid(self) -> int:  # noqa: D102
        return self.process.pid

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM (the hub drains), wait up to `timeout` s, else kill; the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        return self.process.returncode
