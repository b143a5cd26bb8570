"""The `hearth` command line: bad input is a clear one-line error and exit code 2, never a traceback."""

from __future__ import annotations

import pytest

from hearth.clients.cli import main


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "  "], "prompt is empty"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "top_p"),
    (["generate", "--prompt", "hi", "--max-tokens", "0"], "max_tokens"),
    (["generate", "--prompt", "hi", "--model", "/no/such/model"], "/no/such/model"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hearth: error:") and message in err
    assert "Traceback" not in err


def test_generate_streams_an_answer(smollm_gguf, capsys):
    rc = main(["generate", "--model", str(smollm_gguf), "--prompt", "What is the capital of Germany?",
               "--system", "You are a helpful assistant.", "--max-tokens", "16", "--temperature", "0",
               "--threads", "2"])
    assert rc == 0
    assert "Berlin" in capsys.readouterr().out
