"""sidecar-drain, the engine's authorization plugin, run against the engine scripts/engine.sh
started (its --config-file and PID come in SIDECAR_ENGINE_CONFIG and SIDECAR_ENGINE_PID)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.support.polling import wait_until
from tests.support.processes import Process


def engine_plugins(config: str | Path) -> list[str]:
    """The authorization plugins the engine's settings file lists now."""
    text = Path(config).read_text()
    return list(json.loads(text).get("authorization-plugins") or []) if text.strip() else []


def engine_config() -> tuple[str, str] | None:
    config, pid = os.environ.get("SIDECAR_ENGINE_CONFIG"), os.environ.get("SIDECAR_ENGINE_PID")
    return (config, pid) if config and pid else None


class DrainPlugin:
    """One plugin under its own name (several may run against one engine), stopped by PID."""

    def __init__(self, consul_url: str, workdir: Path, name: str, drain: str = "1s", *extra: str) -> None:
        engine = engine_config()
        if engine is None:
            raise RuntimeError("no SIDECAR_ENGINE_CONFIG: the engine was not started by scripts/engine.sh")
        self.name = name
        self.socket = Path(f"/run/docker/plugins/{name}.sock")
        self.config = Path(engine[0])
        args = ["--consul", consul_url, "--socket", f"/run/docker/plugins/{name}.sock", "--drain", drain,
                "--engine-config", engine[0], "--engine-pid", engine[1], *extra]  # fmt: skip
        self.proc = Process("registrar.drain_guard", args, workdir)
        wait_until(lambda: "serving plugin=" in self.output() or not self.proc.alive(), timeout=15, what="plugin up")
        if not self.proc.alive() or not self.enabled():
            raise RuntimeError(f"the drain plugin did not start:\n{self.output()[-2000:]}")

    def output(self) -> str:
        return self.proc.output()

    def enabled(self) -> bool:
        return self.name in engine_plugins(self.config)

    def worker_pid(self) -> int:
        out = subprocess.run(["pgrep", "-P", str(self.proc.proc.pid)], capture_output=True, text=True).stdout
        return int(out.split()[0])

    def stop(self) -> int:
        code = self.proc.stop(timeout=15)
        self.socket.unlink(missing_ok=True)  # left behind by a guard a test killed
        return code
