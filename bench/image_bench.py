"""Image figures: size, cold and warm build time, the registrar container's RSS when idle.

Cold: the base image and the sidecar image are removed first (the Debian archive is reached
by mmdebstrap); warm: the same build again, from the layer cache.
Run: .venv/bin/python bench/image_bench.py [--no-cold]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import ROOT, ConsulAgent, docker_client, tempdir, wait_until

TAG = "consul-sidecar:bench"


def build() -> float:
    started = time.monotonic()
    subprocess.run([str(ROOT / "scripts" / "build-image.sh"), TAG], check=True, capture_output=True)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-cold", action="store_true", help="skip the cold build")
    args = parser.parse_args()
    client = docker_client()
    if not args.no_cold:
        base = subprocess.run([str(ROOT / "scripts" / "base-image.sh")], capture_output=True, text=True).stdout.strip()
        for image in (TAG, base):
            subprocess.run(["docker", "rmi", "-f", image], capture_output=True)
        print(f"cold build (base + image)      {build():.1f} s")
    print(f"warm build (layer cache)       {build():.1f} s")
    size = client.images.get(TAG).attrs["Size"]
    print(f"image size                     {size / 1e6:.1f} MB")
    with tempdir() as work:
        agent = ConsulAgent(work)
        agent.start()
        container = client.containers.run(
            TAG, ["registrar", "--consul", agent.url, "--hostname", "imagebench"], detach=True, network_mode="host",
            group_add=[str(os.stat("/var/run/docker.sock").st_gid)],
            volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock"}},
        )  # fmt: skip
        try:
            wait_until(lambda: "docker events connected" in container.logs().decode(), timeout=30)
            time.sleep(10)
            container.reload()
            pid = int(container.attrs["State"]["Pid"])  # tini
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            registrar = next(p for p in procs if p.pid != pid and "registrar" in " ".join(p.cmdline()))
            print(f"registrar container RSS idle   {registrar.memory_info().rss / 2**20:.1f} MiB "
                  f"(tini {psutil.Process(pid).memory_info().rss / 2**20:.1f} MiB)")  # fmt: skip
        finally:
            container.remove(force=True)
            agent.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
