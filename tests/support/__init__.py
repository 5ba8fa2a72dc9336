"""Real services for the tests, split by concern: polling (ports, waiting), status (/health,
/metrics), consul (a dev agent), containers (the engine, the test image), processes (the
programs under test), forwarders (sockets a test can cut or slow).

Everything started here is stopped by PID; every container is labelled TEST_LABEL and only
containers with that label are removed. The names are re-exported here for the tests and bench/.
"""

from devtools.demo_image import IMAGE, ensure_image
from tests.support.consul import ConsulAgent
from tests.support.containers import HTTPD, TEST_LABEL, Containers, docker_client, remove_test_containers
from tests.support.forwarders import TcpForwarder, UnixSocketForwarder
from tests.support.polling import free_port, free_ports, tempdir, wait_until
from tests.support.processes import ROOT, Process
from tests.support.status import health, scrape

__all__ = [
    "HTTPD", "IMAGE", "ROOT", "TEST_LABEL", "ConsulAgent", "Containers", "Process", "TcpForwarder",
    "UnixSocketForwarder", "docker_client", "ensure_image", "free_port", "free_ports", "health",
    "remove_test_containers", "scrape", "tempdir", "wait_until",
]  # fmt: skip
