"""bench/structured.py's scoring, its argument checks and its llama.cpp grammar (no model is run).

    python -m pytest tests/bench/test_bench_structured.py -q
"""

from __future__ import annotations

import pytest

from hearth.clients.cmd_bench import load_benchmark

bench = load_benchmark("structured.py")


def test_score_counts_only_finished_outputs_that_validate():
    joke = bench.JOKE
    ok = bench.score('{"setup": "a", "punchline": "b"}', "stop", 9, joke, 0.1)
    assert ok["valid"] and not ok["length"] and ok["tokens"] == 9
    cut = bench.score('{"setup": "a", "punchline": "b"}', "length", 160, joke, 0.1)
    assert not cut["valid"] and cut["length"]
    for text in ('{"setup": "a"}', '{"setup": "a", "punchline": ', "", None):
        r = bench.score(text, "stop", 5, joke, 0.1)
        assert not r["valid"] and not r["length"] and r["error"], text


@pytest.mark.parametrize("argv", [["--variants", "nope"], ["--variants", "llama.cpp+no-hint"],
                                  ["--methods", "xml"], ["--cases", "joke,unknown"], ["--seeds", "one"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2


def test_the_peer_grammar_has_llama_servers_whitespace_and_strings():
    gbnf = bench.server_gbnf({k: v for k, v in bench.JOKE.items() if k not in ("title", "description")})
    assert bench.SERVER_SPACE_GBNF in gbnf.splitlines() and bench.SERVER_CHAR_GBNF in gbnf.splitlines()
    assert 'space ::= " "?' not in gbnf
