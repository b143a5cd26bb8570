"""Quality report and gate: on tiny trained models a clean copy matches its parent and passes the gate,
a damaged copy drifts and fails it; numbers land in the manifest, report.md and report.png; GGUF works."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from hearth.quantize.common import QualityGateError, QuantizeError, quantized_manifest
from hearth.quantize.report import (EvalConfig, ParentCache, Report, evaluate, gate, load_saved_report,
                                    markdown_table, plot_reports, report_paths, save_report)
from hearth.quantize.report_eval import answer_agreement, heldout_text, plan_windows
from hearth.runtime.checkpoint import Manifest, Parent, content_hash, read_manifest, write_manifest
from hearth.runtime.errors import ModelNotFoundError

from tests.conftest import build_tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train_on_heldout(path: Path, steps: int = 60) -> None:
    """A few Adam steps on the held-out texts, so perplexity means something and noise hurts it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok.encode(heldout_text("en")[:2500], add_special_tokens=False) + \
        tok.encode(heldout_text("zh")[:500], add_special_tokens=False)
    n = len(ids) // 128 * 128
    batch = torch.tensor(ids[:n]).view(-1, 128)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path, safe_serialization=True)


def _child(parent: Path, out: Path, noise: float = 0.0, method: str = "copy") -> Path:
    """A copy of `parent` with a manifest naming it; noise > 0 adds Gaussian noise to every MLP weight."""
    shutil.copytree(parent, out)
    if noise:
        import torch
        from safetensors.torch import load_file, save_file
        f = out / "model.safetensors"
        tensors = load_file(f)
        g = torch.Generator().manual_seed(1)
        for name, t in tensors.items():
            if ".mlp." in name and t.dim() == 2:
                tensors[name] = t + noise * t.std() * torch.randn(t.shape, generator=g)
        save_file(tensors, f, metadata={"format": "pt"})
    write_manifest(out, quantized_manifest(parent, method, {"noise": noise}))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    parent = build_tiny_model(root / "parent")
    _train_on_heldout(parent)
    return {"parent": parent, "clean": _child(parent, root / "clean"),
            "damaged": _child(parent, root / "damaged", noise=0.1, method="noise-0.1")}


@pytest.fixture(scope="module")
def cache():
    with ParentCache() as c:
        yield c


@pytest.fixture(scope="module")
def clean_report(models, cache) -> Report:
    return evaluate(models["clean"], quick=True, parent_cache=cache, progress=False)


@pytest.fixture(scope="module")
def damaged_report(models, cache) -> Report:
    return evaluate(models["damaged"], quick=True, parent_cache=cache, progress=False)


# ----------------------------------------------------------------------------- pure pieces


def test_windows_score_every_token_once_with_context():
    for n, window, stride in [(2, 8, 4), (1000, 128, 64), (300, 128, 128), (129, 128, 64)]:
        plan = plan_windows(n, window, stride)
        scored = [t for w in plan for t in range(w.score_from, w.end)]
        assert scored == list(range(1, n))
        assert all(w.end - w.begin <= window for w in plan)
        # after the first window each scored token sees at least window - stride earlier tokens
        assert all(w.score_from - w.begin >= min(window - stride, w.score_from) for w in plan[1:])
    with pytest.raises(QuantizeError, match="at least 2"):
        plan_windows(1, 8, 4)


def test_answer_agreement_cuts_at_stop_tokens():
    assert answer_agreement([1, 2, 3, 9, 5], [1, 2, 3, 9, 7], stops={9}) == (True, 1.0)
    same, frac = answer_agreement([1, 2, 3, 4], [1, 2, 8, 4], stops={9})
    assert not same and frac == pytest.approx(0.5)
    assert answer_agreement([9, 1], [9, 2], stops={9}) == (True, 1.0)
    assert answer_agreement([1, 2], [3], stops=set()) == (False, 0.0)


# ----------------------------------------------------------------------------- clean vs damaged


def test_identical_copy_matches_its_parent_and_passes(clean_report, models):
    r = clean_report
    assert r.parent == str(models["parent"].resolve())
    assert r.kl_mean == pytest.approx(0.0, abs=1e-9) and r.kl_max < 1e-6
    assert r.top1_agreement == 1.0
    assert r.ppl_increase_pct == pytest.approx(0.0, abs=1e-6)
    assert r.greedy_exact == 1.0 and r.greedy_prefix == 1.0
    assert r.size_ratio == pytest.approx(1.0)
    assert r.parent_hash_match is True and r.tokenizer_match and not r.notes
    # the trained tiny model is far better than uniform over its 400 tokens
    assert 1.0 < r.ppl_parent < 100.0 and r.ppl == pytest.approx(r.ppl_parent)
    assert r.n_tokens_en == 255 and r.n_tokens_zh == 255 and r.n_prompts == 4
    assert r.decode_tok_s is not None and r.decode_tok_s > 0
    assert r.backend == "transformers" and r.method == "copy"
    gate(r, 1.0)  # passes


def test_damaged_copy_drifts_and_fails_the_gate(clean_report, damaged_report):
    r = damaged_report
    assert r.kl_mean > 0.1 and r.kl_mean > 1000 * max(clean_report.kl_mean, 1e-9)
    assert r.top1_agreement < 0.9
    assert r.ppl_increase_pct > 10.0
    assert r.ppl_parent == pytest.approx(clean_report.ppl_parent)  # same parent run
    assert r.greedy_prefix < 1.0 and r.greedy_exact < 1.0
    gate(r, 5.0)  # a quick report is not gated (its increase is not comparable); it records that
    assert r.gate_result == "not checked (quick report)"
    r = dataclasses.replace(r, quick=False)  # the same numbers from a full report
    with pytest.raises(QualityGateError) as e:
        gate(r, 5.0)
    msg = str(e.value)
    assert f"{r.ppl_increase_pct:+.2f}%" in msg and "+5.00%" in msg and "damaged" in msg
    assert r.gate_result == "fail"
    gate(r, None)  # no threshold: no gate
    gate(r, r.ppl_increase_pct + 1.0)
    assert r.gate_result == "pass"


def test_parent_is_measured_once_per_cache(models, monkeypatch):
    from hearth.quantize import report_eval
    calls = []
    real = report_eval.run_parent

    def counting(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(report_eval, "run_parent", counting)
    with ParentCache() as c:
        a = evaluate(models["clean"], quick=True, parent_cache=c, progress=False)
        b = evaluate(models["damaged"], quick=True, parent_cache=c, progress=False)
    assert len(calls) == 1
    assert a.ppl_parent == b.ppl_parent


def test_save_report_writes_manifest_markdown_and_png(clean_report, models):
    art = models["clean"]
    before = content_hash(art)
    written = save_report(clean_report, art)
    md, png = report_paths(art)
    assert md == art / "report.md" and png == art / "report.png"
    assert set(written) == {art / "hearth.json", md, png}
    quality = read_manifest(art).metrics["quality"]
    assert quality["kl_mean"] == clean_report.kl_mean and quality["ppl"] == clean_report.ppl
    assert quality["top1_agreement"] == 1.0 and quality["parent"] == clean_report.parent
    assert read_manifest(art).stage == "quantized"  # the rest of the manifest is kept
    text = md.read_text()
    assert f"{clean_report.ppl:.3f}" in text and f"{clean_report.ppl_parent:.3f}" in text
    assert "100.0%" in text and "4/4" in text
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert content_hash(art) == before  # report files are not part of the model's identity
    back = load_saved_report(art)
    assert back.ppl == clean_report.ppl and back.kl_mean == clean_report.kl_mean
    assert not list(art.glob(".*tmp*"))  # no temp files left behind


def test_table_and_comparison_plot(clean_report, damaged_report, tmp_path):
    table = markdown_table([clean_report, damaged_report])
    lines = table.strip().splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| clean | copy |") and lines[3].startswith("| damaged | noise-0.1 |")
    assert f"{damaged_report.ppl_increase_pct:+.2f}%" in lines[3] and "+0.00%" in lines[2]
    assert f"{damaged_report.kl_mean:.4f}" in lines[3]
    out = plot_reports([clean_report, damaged_report], tmp_path / "sub" / "cmp.png")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000
    # a report read back from JSON (no per-token KL) still renders
    again = Report.from_dict(json.loads(json.dumps(damaged_report.to_dict())))
    assert again.kl_tokens is None and again.ppl == damaged_report.ppl
    plot_reports([again], tmp_path / "one.png")


def test_markdown_shows_non_finite_numbers_as_dashes():
    r = Report(artifact="/x/a", parent="/x/p", n_prompts=2)
    md = r.to_markdown()
    assert "| perplexity, both | — | — |" in md
    assert Report.from_dict(r.to_dict()).ppl != Report.from_dict(r.to_dict()).ppl  # NaN back
    with pytest.raises(QualityGateError, match="could not be measured"):
        gate(r, 10.0)


# ----------------------------------------------------------------------------- errors


def test_missing_artifact(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no artifact"):
        evaluate(tmp_path / "nope", quick=True, progress=False)


def test_no_parent_named(models, tmp_path):
    orphan = tmp_path / "orphan"
    shutil.copytree(models["parent"], orphan)
    with pytest.raises(QuantizeError, match="--against"):
        evaluate(orphan, quick=True, progress=False)


def test_missing_parent(models, tmp_path):
    child = tmp_path / "child"
    shutil.copytree(models["parent"], child)
    gone = tmp_path / "gone"
    write_manifest(child, Manifest(stage="quantized", method="x", parent=Parent(str(gone), "0" * 64)))
    with pytest.raises(ModelNotFoundError, match=str(gone)):
        evaluate(child, quick=True, progress=False)
    with pytest.raises(ModelNotFoundError, match="--against"):
        evaluate(child, against=tmp_path / "also-gone", quick=True, progress=False)


def test_vocabulary_mismatch_is_refused(models, tmp_path):
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers, trainers
    other = tmp_path / "other"
    shutil.copytree(models["parent"], other)
    tok = Tokenizer.from_file(str(other / "tokenizer.json"))
    fresh = Tokenizer(tmodels.BPE())
    fresh.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fresh.decoder = tok.decoder
    trainer = trainers.BpeTrainer(vocab_size=len(tok.get_vocab()),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    fresh.train_from_iterator(["zebra quartz vexing jumps " * 50, "完全不同的词表" * 50], trainer)
    fresh.save(str(other / "tokenizer.json"))
    with pytest.raises(QuantizeError, match="vocabularies differ"):
        evaluate(other, against=models["parent"], quick=True, progress=False)


def test_extra_tokens_past_the_parents_vocabulary_are_left_out(models, tmp_path):
    """An artifact whose vocabulary only adds ids at the end (e.g. padding entries) is compared over the
    shared ids, with a note; the shared logits are unchanged, so KL is zero."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    wider = tmp_path / "wider"
    tok = AutoTokenizer.from_pretrained(models["parent"])
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    model = AutoModelForCausalLM.from_pretrained(models["parent"], dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(wider, safe_serialization=True)
    tok.save_pretrained(wider)
    write_manifest(wider, quantized_manifest(models["parent"], "wider"))
    cfg = EvalConfig(window=64, stride=32, max_text_tokens=96, prompts=(0, 14), max_new_tokens=4, quick=True)
    r = evaluate(wider, config=cfg, progress=False)
    assert any("differ in size" in n and "402" in n and "400" in n for n in r.notes)
    assert r.kl_mean == pytest.approx(0.0, abs=1e-9) and r.top1_agreement == 1.0


def test_changed_parent_is_noted(models, tmp_path):
    child = tmp_path / "pinned-wrong"
    shutil.copytree(models["clean"], child)
    m = read_manifest(child)
    m.parent = Parent(m.parent.path, "f" * 64)
    write_manifest(child, m)
    cfg = EvalConfig(window=64, stride=64, max_text_tokens=64, prompts=(0,), max_new_tokens=4, quick=True)
    r = evaluate(child, config=cfg, progress=False)
    assert r.parent_hash_match is False and any("changed" in n for n in r.notes)
    assert r.window == 64 and r.n_tokens_en == 63 and r.n_prompts == 1


# ----------------------------------------------------------------------------- GGUF


def test_tiny_gguf_names_its_parent_in_metadata(models, tmp_path):
    """A GGUF converted from the tiny parent: the parent comes from its `hearth.manifest`, it runs on
    llama.cpp, and the report lands in its metadata and beside the file."""
    from hearth.quantize.gguf import convert, read_hearth_metadata
    gguf = convert(models["parent"], tmp_path / "tiny.f16.gguf", "f16")
    r = evaluate(gguf, quick=True, progress=False)
    assert r.parent == str(models["parent"].resolve()) and r.parent_hash_match is True
    assert r.backend == "llama.cpp" and r.artifact_format == "gguf" and r.method == "gguf-f16"
    assert r.tokenizer_match
    assert 0.0 < r.kl_mean < 1e-3 and r.top1_agreement > 0.98 and abs(r.ppl_increase_pct) < 1.0
    assert 0.4 < r.size_ratio < 0.7  # f16 vs fp32
    link = tmp_path / "linked.gguf"
    link.symlink_to(gguf)
    assert save_report(r, link) == [tmp_path / "linked.gguf.report.md", tmp_path / "linked.gguf.report.png"]
    assert link.is_symlink() and "hearth.quality" not in read_hearth_metadata(gguf)  # a link is not rewritten
    written = save_report(r, gguf)
    assert set(written) == {gguf, tmp_path / "tiny.f16.gguf.report.md", tmp_path / "tiny.f16.gguf.report.png"}
    meta = read_hearth_metadata(gguf)
    assert meta["hearth.quality"]["kl_mean"] == pytest.approx(r.kl_mean)
    assert meta["hearth.manifest"]["parent"]["path"] == str(models["parent"].resolve())  # lineage kept
    assert load_saved_report(gguf).top1_agreement == r.top1_agreement
    assert f"{r.ppl:.3f}" in (tmp_path / "tiny.f16.gguf.report.md").read_text()


@pytest.mark.slow
def test_gguf_against_its_hf_checkpoint(smollm_gguf, tmp_path):
    """The default model's Q4_1 GGUF (llama.cpp) against the fp32 HF checkpoint dequantized from it
    (transformers): the same weights up to fp32 vs llama.cpp kernels, so KL is tiny but not zero."""
    pytest.importorskip("hearth.quantize.gguf")
    from hearth.runtime.registry import resolve_model
    hf = Path(resolve_model("smollm2-135m-instruct", prefer="hf"))  # built once if not yet there
    gguf = tmp_path / "smollm2.gguf"
    shutil.copyfile(smollm_gguf, gguf)  # save_report edits GGUF metadata: never the installed file
    r = evaluate(gguf, against=hf, quick=True, progress=False)
    assert r.backend == "llama.cpp" and r.parent_backend == "transformers"
    assert r.tokenizer_match
    assert 0.0 < r.kl_mean < 0.05
    assert r.top1_agreement > 0.85
    assert abs(r.ppl_increase_pct) < 5.0
    assert 5.0 < r.ppl_parent < 200.0
    assert r.size_ratio < 0.3  # Q4_1 vs fp32
    written = save_report(r, gguf)
    md, png = report_paths(gguf)
    assert md == tmp_path / "smollm2.gguf.report.md" and png.exists()
    assert set(written) == {gguf, md, png}
    back = load_saved_report(gguf)
    assert back.kl_mean == pytest.approx(r.kl_mean) and back.artifact == r.artifact
    gate(r, 5.0)
    print(markdown_table([r]))
