"""The Docker engine and the test image; every container is labelled TEST_LABEL and only those are removed."""

from __future__ import annotations

import contextlib
from typing import Any

import docker

from devtools.demo_image import IMAGE

TEST_LABEL = "consul-sidecar.test"


def docker_client() -> docker.DockerClient:
    return docker.from_env(timeout=60)


def remove_test_containers(client: docker.DockerClient, session: str | None = None) -> None:
    selector = f"{TEST_LABEL}={session}" if session else TEST_LABEL
    for container in client.containers.list(all=True, filters={"label": selector}):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            container.remove(force=True)


HTTPD = "httpd -f -p 8080 -h /www"


class Containers:
    """Starts labelled test containers; each publishes its ports on 127.0.0.1 only."""

    def __init__(self, client: docker.DockerClient, session: str) -> None:
        self.client = client
        self.session = session
        self.count = 0

    def run(
        self,
        labels: dict[str, str] | None = None,
        command: str | None = HTTPD,
        ports: tuple[str, ...] = ("8080/tcp",),
        name: str | None = None,
        image: str = IMAGE,
        **kwargs: Any,
    ) -> Any:
        """command runs under sh -c; None runs the image's own entrypoint."""
        self.count += 1
        all_labels = {TEST_LABEL: self.session, **(labels or {})}
        kwargs.setdefault("stop_signal", "SIGTERM")
        return self.client.containers.run(
            image,
            ["sh", "-c", command] if command is not None else None,
            name=name or f"t{self.session}-{self.count}",
            labels=all_labels,
            ports={p: ("127.0.0.1", None) for p in ports},
            detach=True,
            **kwargs,
        )

    def host_port(self, container: Any, port: str = "8080/tcp") -> int:
        container.reload()
        return int(container.attrs["NetworkSettings"]["Ports"][port][0]["HostPort"])
