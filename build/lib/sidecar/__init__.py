"""Pieces shared by the registrar and the templater: Consul connection, backoff, logging."""
