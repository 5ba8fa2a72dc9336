"""SIGHUP with -config: the configuration files read again, and what of them takes effect. Pure.

Templates added, removed or changed take effect (a changed one starts afresh; an unchanged one
keeps its state, kept blocks and last output), and so do the wait and the log level. Anything
else the files set (the Consul agent, exec, the proxy) is said to need a restart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from templater.settings import Settings
from templater.writer import TemplateState

TAKEN = ("templates", "wait_min", "wait_max", "log_level", "notes")  # what a reload changes in place


@dataclass(frozen=True)
class Reloaded:
    settings: Settings
    templates: list[TemplateState]
    added: list[str]
    removed: list[str]
    changed: list[str]
    restart: list[str]  # settings that differ but take effect only on a restart


def reloaded(running: Settings, states: list[TemplateState], fresh: Settings) -> Reloaded:
    kept = {state.spec: state for state in states}
    templates = [kept.get(spec) or TemplateState(spec) for spec in fresh.templates]
    old_by_name = {state.spec.name: state.spec for state in states}
    new_by_name = {spec.name: spec for spec in fresh.templates}
    restart = [
        f.name
        for f in dataclasses.fields(Settings)
        if f.name not in TAKEN and getattr(running, f.name) != getattr(fresh, f.name)
    ]
    if states and templates and states[0].spec.dest != templates[0].spec.dest and running.proxy:
        restart.append("the proxy's template (the first)")
    taken = {name: getattr(fresh, name) for name in TAKEN}
    return Reloaded(
        settings=dataclasses.replace(running, **taken),
        templates=templates,
        added=sorted(set(new_by_name) - set(old_by_name)),
        removed=sorted(set(old_by_name) - set(new_by_name)),
        changed=sorted(n for n in set(new_by_name) & set(old_by_name) if new_by_name[n] != old_by_name[n]),
        restart=restart,
    )
