"""`hearth serve` under Ray is quiet by default: lines Ray's workers print that are wrong for the
one-machine Ray hearth starts are left out of the terminal, everything else passes (the whole start is
checked end to end by tests/test_readme.py).

    python -m pytest tests/serve/test_ray_quiet.py -q
"""

from __future__ import annotations

import logging

from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

from hearth.serve import ray_app


def test_worker_lines_known_as_noise_are_dropped_and_the_rest_printed():
    printed = []
    dispatcher.add_handler("ray_print_logs", printed.append)
    try:
        assert ray_app._drop_worker_lines(ray_app.ONE_MACHINE_NOISE)
        assert ray_app._drop_worker_lines(ray_app.ONE_MACHINE_NOISE)  # twice wraps once
        advice = ("WARNING controller -- HTTPOptions.host='127.0.0.1' won't accept connections from HAProxy "
                  "on other nodes; cross-node routing will fail")
        dispatcher.emit({"pid": 1, "is_err": True, "lines": [advice, "WARNING replica failed to start: boom"]})
        dispatcher.emit({"pid": 1, "is_err": True, "lines": [advice]})
    finally:
        dispatcher.remove_handler("ray_print_logs")
    assert [d["lines"] for d in printed] == [["WARNING replica failed to start: boom"]]


def test_the_drivers_own_serve_info_lines_are_hidden_and_its_warnings_kept(caplog):
    record = logging.LogRecord("ray.serve", logging.INFO, __file__, 1, "Started Serve", None, None)
    assert not ray_app._BELOW_WARNING.filter(record)
    record.levelno = logging.WARNING
    assert ray_app._BELOW_WARNING.filter(record)
    notice = logging.LogRecord("x", logging.WARNING, __file__, 1, "Token authentication is enabled for this Ray "
                               "cluster. Set RAY_AUTH_MODE=disabled to opt out.", None, None)
    assert not ray_app._NOT_TOKEN_NOTICE.filter(notice)
