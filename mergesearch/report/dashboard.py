"""optuna-dashboard on a study's storage, bound to the loopback interface unless asked otherwise."""

from __future__ import annotations

import ipaddress
import logging
import os
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from mergesearch.errors import StudyError

log = logging.getLogger(__name__)


class _QuietHandler(WSGIRequestHandler):
    """Request lines go to the debug log instead of stderr (the CLI shows only the URL)."""

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        log.debug("%s - %s", self.address_string(), format % args)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_dashboard_server(spec: str | os.PathLike, *, study_name: str | None = None, host: str = "127.0.0.1",
                          port: int = 8080) -> tuple[WSGIServer, str]:
    """A (not yet serving) optuna-dashboard server on the storage of `spec` (a study YAML, a storage URL or
    a .db/.log file) and the URL of the study's page. Port 0 picks a free port. Call `serve_forever()`."""
    from optuna_dashboard import wsgi

    from mergesearch.study import resolve_storage
    from mergesearch.study.storage import open_storage

    url, name, _ = resolve_storage(spec, study_name)
    storage = open_storage(url, heartbeat=False)
    if not _is_loopback(host):
        log.warning("the dashboard listens on %s: anyone who can reach this machine can read and annotate "
                    "the study (optuna-dashboard has no authentication)", host)
    try:
        server = make_server(host, port, wsgi(storage), handler_class=_QuietHandler)
    except OSError as exc:
        raise StudyError(f"cannot listen on {host}:{port} ({exc.strerror}): pass another --port or --host") from None
    bound_port = server.server_address[1]
    study_id = storage.get_study_id_from_name(name)
    shown = f"[{host}]" if ":" in host else host
    return server, f"http://{shown}:{bound_port}/dashboard/studies/{study_id}"
