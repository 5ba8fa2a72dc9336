"""Errors shared by both programs. Third-party errors are mapped to these at the adapters.

SidecarError
 +-- Unavailable         a backend (Consul, Docker) did not answer; retried with capped backoff
 |    +-- ConsulUnavailable
 +-- ConsulRejected      Consul answered but refused a request (bad definition, ACL, 4xx)
      +-- ConsulForbidden   403: the ACL token lacks a permission, or is unknown (revoked)

Each program adds its own on top (registrar.errors, templater.errors).
"""

from __future__ import annotations


class SidecarError(Exception):
    pass


class Unavailable(SidecarError):
    pass


class ConsulUnavailable(Unavailable):
    pass


class ConsulRejected(SidecarError):
    pass


class ConsulForbidden(ConsulRejected):
    """The token lacks a permission the operation needs, or Consul does not know it (revoked,
    expired). Retried with backoff: a token file rewritten with a valid token ends it."""
