"""optuna-dashboard serves a stored study: HTTP checks against its API on a free loopback port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from mergesearch.errors import StudyError
from mergesearch.report import make_dashboard_server
from report_helpers import make_study


def _get_json(url: str, tries: int = 50) -> object:
    """GET with bounded retries while the server starts."""
    for i in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.status == 200
                return json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError):
            if i == tries - 1:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> str:
    return make_study(tmp_path_factory.mktemp("dash"), 2, n_search=6)


def test_dashboard_api_serves_the_study(storage):
    server, url = make_dashboard_server(storage, port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        studies = _get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["demo"]
        study_id = studies[0]["study_id"]
        assert host == "127.0.0.1" and url == f"http://127.0.0.1:{port}/dashboard/studies/{study_id}"
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{study_id}")
        trials = detail["trials"]
        assert len(trials) == 6 + 3  # searched, pruned + failed + running: the baselines are beside them
        attrs = {a["key"]: a["value"] for a in detail["user_attrs"]}
        assert "uniform" in attrs["baselines"]  # ... in a study user attribute the dashboard shows
        assert detail["objective_names"] == ["arith", "reverse"]  # Study.set_metric_names
        # the dashboard's Pareto front is the report's
        from mergesearch.report import pareto_info
        from mergesearch.study import load_study

        # (the report's front also weighs the baselines, which can only remove searched trials from it)
        searched_front = {n for n in pareto_info(load_study(storage)).front if n >= 0}
        assert searched_front and searched_front <= {t["number"] for t in detail["best_trials"]}
        with urllib.request.urlopen(url, timeout=10) as resp:  # the page itself
            assert resp.status == 200 and b"<html" in resp.read().lower()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_dashboard_cli_prints_the_url_and_serves(storage):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mergesearch", "dashboard", storage, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # the CLI prints the URL once the socket is bound
        assert line.startswith("optuna-dashboard: http://127.0.0.1:"), (line, proc.stderr.read() if
                                                                         proc.poll() is not None else "")
        url = line.split()[1]
        base = url.split("/dashboard")[0]
        studies = _get_json(f"{base}/api/studies")["study_summaries"]
        assert studies[0]["study_name"] == "demo"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_dashboard_refuses_a_busy_port(storage):
    server, url = make_dashboard_server(storage, port=0)
    try:
        with pytest.raises(StudyError, match="pass another --port"):
            make_dashboard_server(storage, port=server.server_address[1])
    finally:
        server.server_close()
