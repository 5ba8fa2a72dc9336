"""A small busybox image built locally from the host's busybox-static (no registry needed).

It serves /www with busybox httpd, with /cgi-bin/slow answering GET and POST in 30 ms. The
main job's demo containers and the tests both run it.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import docker

IMAGE = "consul-sidecar-test:busybox3"


def ensure_image(client: docker.DockerClient) -> str:
    """Import the image from a tarball unless it is there; its name."""
    try:
        client.images.get(IMAGE)
        return IMAGE
    except docker.errors.ImageNotFound:
        pass
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox-static is not installed (scripts/install-deps.sh installs it)")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("bin", "tmp", "www", "www/cgi-bin"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in ("sh", "httpd", "nc", "sleep", "echo", "cat", "kill", "true", "wget", "date", "head"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        # a 30 ms response, as the zero-drop tests ask for; GET and POST
        slow = (
            b'#!/bin/sh\n[ "$REQUEST_METHOD" = POST ] && head -c "$CONTENT_LENGTH" >/dev/null\nsleep 0.03\n'
            b'printf "Content-Type: text/plain\\r\\n\\r\\nok %s\\n" "$HOSTNAME"\n'
        )
        _add(tar, "www/cgi-bin/slow", slow, 0o755)
        # /cgi-bin/sleep?N answers after N seconds: a request in flight while something stops
        sleep = (
            b'#!/bin/sh\ncase "$QUERY_STRING" in ""|*[!0-9]*) n=1;; *) n="$QUERY_STRING";; esac\nsleep "$n"\n'
            b'printf "Content-Type: text/plain\\r\\n\\r\\nslept %s\\n" "$n"\n'
        )
        _add(tar, "www/cgi-bin/sleep", sleep, 0o755)
        _add(tar, "www/index.html", b"ok\n", 0o644)
    client.api.import_image_from_data(
        buf.getvalue(), repository=IMAGE.split(":")[0], tag=IMAGE.split(":")[1], changes=['CMD ["/bin/sh"]']
    )
    return IMAGE


KEEPALIVE_IMAGE = "consul-sidecar-test:keepalive"


def ensure_keepalive_image(client: docker.DockerClient, base: str) -> str:
    """A Python keep-alive backend (devtools/keepalive_backend.py) on the local Debian base.

    The tag carries a hash of the script, so an edit makes a new image."""
    import hashlib

    script = (Path(__file__).parent / "keepalive_backend.py").read_bytes()
    tag = f"{KEEPALIVE_IMAGE}-{hashlib.sha256(script + base.encode()).hexdigest()[:12]}"
    dockerfile = (
        f"FROM {base}\nCOPY keepalive_backend.py /srv/backend.py\n"
        'ENTRYPOINT ["python3", "/srv/backend.py"]\nCMD ["8080"]\nEXPOSE 8080\n'
    ).encode()
    return _built(client, tag, {"Dockerfile": dockerfile, "keepalive_backend.py": script})


GRPC_IMAGE = "consul-sidecar-test:grpc"


def ensure_grpc_image(client: docker.DockerClient, base: str, wheels: list[Path]) -> str:
    """The gRPC backend (devtools/grpc_backend.py) on the local Debian base, with grpcio and its
    dependencies from wheels downloaded on the host (containers reach no package index),
    unpacked into /opt/grpc.

    The tag carries a hash of the script, the base and the wheels' names."""
    import hashlib

    script = (Path(__file__).parent / "grpc_backend.py").read_bytes()
    names = sorted(w.name for w in wheels)
    tag = f"{GRPC_IMAGE}-{hashlib.sha256(script + base.encode() + ' '.join(names).encode()).hexdigest()[:12]}"
    unpack = f"import zipfile; [zipfile.ZipFile('/tmp/w/' + n).extractall('/opt/grpc') for n in {names!r}]"
    dockerfile = (
        f"FROM {base}\nCOPY grpc_backend.py /srv/backend.py\nCOPY wheels/ /tmp/w/\n"
        f'RUN python3 -c "{unpack}" && rm -r /tmp/w\nENV PYTHONPATH=/opt/grpc\n'
        'ENTRYPOINT ["python3", "/srv/backend.py"]\nCMD ["8080"]\nEXPOSE 8080\n'
    ).encode()
    files = {
        "Dockerfile": dockerfile,
        "grpc_backend.py": script,
        **{f"wheels/{w.name}": w.read_bytes() for w in wheels},
    }
    return _built(client, tag, files)


def _built(client: docker.DockerClient, tag: str, files: dict[str, bytes]) -> str:
    """tag, built from files (a Dockerfile and what it copies) unless the engine has it."""
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            _add(tar, name, data, 0o644)
    buf.seek(0)
    client.images.build(fileobj=buf, custom_context=True, tag=tag, rm=True)
    return tag


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))
