"""The Docker engine as a source of container facts: an event stream, listings, inspections."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import docker
import docker.errors
import requests

from registrar.errors import DockerUnavailable
from registrar.intents import Intent, Listing, from_event, needs_inspect
from registrar.spec import network_owner, with_network_of
from sidecar.backoff import Backoff, sleep

log = logging.getLogger("registrar.docker")

EVENTS = {"start", "die", "kill", "pause", "unpause", "destroy", "rename", "health_status"}


DOCKER_SOCKETS = ("/var/run/docker.sock", "/tmp/docker.sock")  # registrator's docs mount it at /tmp


def default_docker_url(environ: dict[str, str], exists: Callable[[str], bool]) -> str | None:
    """DOCKER_HOST, else the first Docker socket there is (None: docker-py's own default)."""
    if environ.get("DOCKER_HOST"):
        return environ["DOCKER_HOST"]
    return next((f"unix://{path}" for path in DOCKER_SOCKETS if exists(path)), None)


class DockerSource:
    """docker-py behind our error types. The stream is opened before any listing, so that
    nothing that happens between the two is missed (registrator's rule).

    One docker-py client per thread: the event thread and the resync thread both list and
    inspect, and a requests session is not safe to share."""

    def __init__(self, url: str | None, timeout: float = 10.0) -> None:
        self._url = url
        self._timeout = timeout
        self._local = threading.local()
        self._stream: Any = None
        self._lock = threading.Lock()

    def _api(self) -> docker.APIClient:
        client: docker.APIClient | None = getattr(self._local, "client", None)
        if client is None:
            try:
                if self._url:
                    client = docker.APIClient(base_url=self._url, version="auto", timeout=self._timeout)
                else:
                    client = docker.from_env(timeout=self._timeout).api
            except docker.errors.DockerException as err:
                raise DockerUnavailable(f"docker {self.describe()}: {err}") from err
            self._local.client = client
        return client

    def describe(self) -> str:
        return self._url or "default socket"

    def _wrap(self, what: str, err: Exception) -> DockerUnavailable:
        self._local.client = None
        return DockerUnavailable(f"docker {self.describe()} unreachable during {what}: {err}")

    def ping(self) -> None:
        try:
            self._api().ping()
        except (requests.RequestException, docker.errors.DockerException) as err:
            raise self._wrap("ping", err) from err

    def events(self, since: int | None = None) -> Iterator[dict[str, Any]]:
        """Open the container event stream now; iterate it later. Ends when the engine goes."""
        try:
            stream = self._api().events(decode=True, filters={"type": "container"}, since=since)
        except (requests.RequestException, docker.errors.DockerException) as err:
            raise self._wrap("events", err) from err
        with self._lock:
            self._stream = stream
        return self._iterate(stream)

    def _iterate(self, stream: Any) -> Iterator[dict[str, Any]]:
        try:
            for event in stream:
                action = str(event.get("Action") or event.get("status") or "")
                if action.split(":", 1)[0] in EVENTS:
                    yield event
        except (requests.RequestException, docker.errors.DockerException, OSError, ValueError) as err:
            raise self._wrap("event stream", err) from err
        except AttributeError as err:
            # docker-py's stream raises this when close() races a read: treat as a closed stream.
            log.debug("event stream closed: %s", err)

    def close_events(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception as err:  # closing a dead socket may fail in many ways; it is closed either way
                log.debug("closing event stream: %s", err)

    def running(self) -> list[str]:
        try:
            return [c["Id"] for c in self._api().containers(quiet=True)]
        except (requests.RequestException, docker.errors.DockerException) as err:
            raise self._wrap("list", err) from err

    def stop(self, container_id: str, timeout: int) -> None:
        """`docker stop`: the stop signal, then SIGKILL after `timeout` seconds. docker-py waits
        that long plus its own timeout for the answer."""
        try:
            self._api().stop(container_id, timeout=timeout)
        except (requests.RequestException, docker.errors.DockerException) as err:
            raise self._wrap(f"stop {container_id[:12]}", err) from err

    def authorization_plugins(self) -> list[str]:
        """The engine's authorization plugins (docker info), in the order it asks them."""
        try:
            info: dict[str, Any] = self._api().info()
        except (requests.RequestException, docker.errors.DockerException) as err:
            raise self._wrap("info", err) from err
        return [str(p) for p in (info.get("Plugins") or {}).get("Authorization") or []]

    def inspect(self, container_id: str) -> dict[str, Any] | None:
        """The container's inspect data, or None when it no longer exists."""
        try:
            data: dict[str, Any] = self._api().inspect_container(container_id)
            return data
        except docker.errors.NotFound:
            return None
        except (requests.RequestException, docker.errors.DockerException) as err:
            raise self._wrap(f"inspect {container_id[:12]}", err) from err


class DockerWatcher:
    """Feeds the sync loop from the event stream; on any break, reopens it with backoff and
    lists everything again so that nothing missed stays missed."""

    def __init__(
        self,
        source: DockerSource,
        submit: Callable[[Intent], None],
        mark: Callable[[], int],
        retry_interval: float = 2.0,
    ) -> None:
        self._source = source
        self._submit = submit
        self._mark = mark
        self._backoff = Backoff(base=0.1, cap=retry_interval)
        self._up: bool | None = None
        self.last_error = ""
        self.connected = threading.Event()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                stream = self._source.events()
                self.list_all()
                self._state(True, None)
                self._backoff.reset()
                for event in stream:
                    self._event(event)
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                raise DockerUnavailable(f"docker {self._source.describe()}: event stream ended")
            except DockerUnavailable as err:
                self._state(False, err)
                if sleep(stop, self._backoff.next_delay()):
                    return

    @property
    def up(self) -> bool | None:
        """Whether the event stream is connected (None before the first attempt)."""
        return self._up

    def stop(self) -> None:
        self._source.close_events()

    def _inspect(self, container_id: str) -> dict[str, Any] | None:
        """The container's inspect data; for one in another's network namespace, with that
        one's addresses and published ports."""
        data = self._source.inspect(container_id)
        owner = network_owner(data) if data is not None else None
        if data is None or owner is None:
            return data
        shared = self._source.inspect(owner)
        return with_network_of(data, shared) if shared is not None else data

    def list_all(self) -> None:
        since = self._mark()
        inspects = []
        for container_id in self._source.running():
            data = self._inspect(container_id)
            if data is not None and (data.get("State") or {}).get("Running"):
                inspects.append(data)
        self._submit(Listing(inspects, since=since))

    def _event(self, event: dict[str, Any]) -> None:
        action = str(event.get("Action") or event.get("status") or "")
        container_id = str((event.get("Actor") or {}).get("ID") or event.get("id") or "")
        inspect = self._inspect(container_id) if needs_inspect(action) else None
        intent = from_event(event, inspect)
        if intent is not None:
            self._submit(intent)

    def state(self) -> tuple[bool, str]:
        """(following the engine's events, what a person should read about it)."""
        if self._up:
            return True, f"Docker engine events followed ({self._source.describe()})"
        return False, f"Docker engine unreachable ({self._source.describe()}): {self.last_error or 'not connected yet'}"

    def _state(self, up: bool, err: Exception | None) -> None:
        if not up:
            self.last_error = str(err)
        if up:
            self.connected.set()
        else:
            self.connected.clear()
        if self._up is not up:
            if up:
                log.info("docker events connected %s", self._source.describe())
            else:
                log.warning("docker unavailable, will retry: %s", err)
        self._up = up
