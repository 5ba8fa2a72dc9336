"""The soak for as long as you like (default 30 minutes): figures, and a plot of RSS, open file
descriptors and threads of the registrar, the templater and HAProxy (bench/soak.png).

    .venv/bin/python bench/soak_bench.py [--minutes 30] [--consul-every 300] [--edit-every 60]

Everything of tests/soak.py at once: containers started and stopped about once a second (half
with sidecar-stop), the Consul dev agent restarted every --consul-every seconds (it loses its
state), the template edited every --edit-every seconds (HAProxy reloads), load through HAProxy
all along. Failed requests are printed, and each figure's slope after the warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tests.soak import METRICS, PROGRAMS, SoakResult, soak
from tests.support import ConsulAgent, Containers, docker_client, ensure_image, remove_test_containers, tempdir

HERE = Path(__file__).resolve().parent


def plot(result: SoakResult, restarts: list[float], out: Path, warm_up: float) -> None:
    titles = {"rss_mib": "RSS (MiB)", "fds": "open file descriptors", "threads": "threads"}
    fig, axes = plt.subplots(len(METRICS), 1, figsize=(9, 8), sharex=True)
    minutes = [s["t"] / 60 for s in result.samples]
    for ax, metric in zip(axes, METRICS, strict=True):
        for program in PROGRAMS:
            ax.plot(minutes, [s[f"{program}_{metric}"] for s in result.samples], label=program)
        for t in restarts:
            ax.axvline(t / 60, color="grey", linewidth=0.5, linestyle=":")
        ax.axvspan(0, warm_up / 60, color="grey", alpha=0.08)
        ax.set_ylabel(titles[metric])
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", ncol=3)
    axes[0].set_title(
        f"soak: {result.seconds / 60:.0f} min, {result.requests} requests, {len(result.failures)} failed, "
        f"{result.started} containers started\n(dotted: the Consul agent restarted; shaded: warm-up)",
        fontsize=10,
    )
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--consul-every", type=float, default=300)
    parser.add_argument("--edit-every", type=float, default=60)
    parser.add_argument("--warm-up", type=float, default=120, help="seconds left out of the slopes")
    parser.add_argument("--png", default=str(HERE / "soak.png"))
    parser.add_argument("--json", help="the samples, for another look")
    args = parser.parse_args()
    session = uuid.uuid4().hex[:6]
    client = docker_client()
    ensure_image(client)
    with tempdir() as work:
        agent = ConsulAgent(work)
        agent.start()
        try:
            result = soak(agent, Containers(client, session), work, f"h{session}", args.minutes * 60,
                          args.consul_every, args.edit_every, progress=print)  # fmt: skip
        finally:
            agent.stop()
            remove_test_containers(client, session)
    restarts = [args.consul_every * (n + 1) for n in range(result.consul_restarts)]
    print(f"soak {result.seconds / 60:.1f} min: {result.requests} requests, {len(result.failures)} failed; "
          f"{result.started} containers started, {result.stopped} stopped; {result.consul_restarts} Consul "
          f"restarts; {result.edits} template edits")  # fmt: skip
    for failure in result.failures[:20]:
        print(f"  failed: {failure}")
    print(f"after the {args.warm_up:.0f} s warm-up:          first     last   slope per minute")
    for program in PROGRAMS:
        for metric in METRICS:
            key = f"{program}_{metric}"
            first, last = result.after(key, args.warm_up)
            print(f"  {key:22} {first:9.1f} {last:8.1f}   {result.slope(key, args.warm_up):+.3f}")
    plot(result, restarts, Path(args.png), args.warm_up)
    print(f"plot: {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
