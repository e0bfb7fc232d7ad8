"""The gateway's router: a request path matched once to a :class:`Route`.

A route carries what every layer after the match needs: the label that names it in
metrics and spans (a template, never a client's value, so labels stay bounded), whether
it is open without a bearer token, whether it is an RPC path, and the app that serves it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agentd.gateway.asgi import ASGIApp

__all__ = ["Route", "Router", "by_label"]


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    label: str  # metrics and span name
    app: ASGIApp  # serves the request (middleware such as the body limit included)
    open: bool = False  # answered without a bearer token when tokens are configured
    rpc: bool = False  # a "/pkg.Service/Method" path: Connect unless a gRPC content type


class Router:
    """Exact paths first, then the unknown methods of a known RPC service, then prefix
    matchers in the order added, then the fallback."""

    def __init__(self, fallback: Route) -> None:
        self._exact: dict[str, Route] = {}
        self._services: dict[str, Route] = {}
        self._prefixes: list[tuple[str, Callable[[str], Route | None]]] = []
        self._fallback = fallback

    def add(self, path: str, route: Route) -> None:
        self._exact[path] = route

    def add_service(self, prefix: str, unknown_method: Route) -> None:
        """``prefix`` is ``/pkg.Service``: its methods not added as paths match
        ``unknown_method``."""
        self._services[prefix] = unknown_method

    def add_prefix(self, prefix: str, match: Callable[[str], Route | None]) -> None:
        """Paths starting with ``prefix`` (and not matched before) go to ``match``; a
        None from it lets the next prefix try."""
        self._prefixes.append((prefix, match))

    @property
    def paths(self) -> frozenset[str]:
        """The exact paths."""
        return frozenset(self._exact)

    def match(self, path: str) -> Route:
        route = self._exact.get(path)
        if route is not None:
            return route
        slash = path.find("/", 1)
        if slash > 0:
            route = self._services.get(path[:slash])
            if route is not None:
                return route
        for prefix, match in self._prefixes:
            if path.startswith(prefix):
                route = match(path)
                if route is not None:
                    return route
        return self._fallback


def by_label(
    label_of: Callable[[str], str | None], make: Callable[[str], Route]
) -> Callable[[str], Route | None]:
    """A prefix matcher from a function giving a path's label (None: not ours): one Route
    per label, made once."""
    routes: dict[str, Route] = {}

    def match(path: str) -> Route | None:
        label = label_of(path)
        if label is None:
            return None
        route = routes.get(label)
        if route is None:
            route = routes[label] = make(label)
        return route

    return match
