"""A small busybox image built locally from the host's busybox-static (no registry needed).

It serves /www with busybox httpd, with /cgi-bin/slow answering GET and POST in 30 ms. The
main job's demo containers and the tests both run it.
"""

from __future__ import annotations

import io
import shutil
import tarfile

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
    from pathlib import Path

    script = (Path(__file__).parent / "keepalive_backend.py").read_bytes()
    tag = f"{KEEPALIVE_IMAGE}-{hashlib.sha256(script + base.encode()).hexdigest()[:12]}"
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    dockerfile = (
        f"FROM {base}\nCOPY keepalive_backend.py /srv/backend.py\n"
        'ENTRYPOINT ["python3", "/srv/backend.py"]\nCMD ["8080"]\nEXPOSE 8080\n'
    ).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("Dockerfile", dockerfile), ("keepalive_backend.py", script)):
            _add(tar, name, data, 0o644)
    buf.seek(0)
    client.images.build(fileobj=buf, custom_context=True, tag=tag, rm=True)
    return tag


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))
