"""What a quality report says beside its numbers: size against f16 and fp32, where the parent's weights came
from (a dequantized GGUF), and the gate drawn on its plots in pass/fail colours.

    python -m pytest tests/quantize/test_report_facts.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from hearth.quantize import report_render
from hearth.quantize.report import Report, markdown_table, param_count, parent_origin, plot_reports
from hearth.runtime.checkpoint import Manifest, Parent, inspect_checkpoint, write_manifest


def _q4_1_gguf(path):
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1))
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf_dir(d, manifest: Manifest | None = None):
    d.mkdir(parents=True)
    save_file({"a": np.zeros((3, 5), dtype=np.float32), "b": np.zeros(7, dtype=np.float32)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if manifest is not None:
        write_manifest(d, manifest)
    return d


def test_a_parent_dequantized_from_a_gguf_says_which(tmp_path):
    source = _q4_1_gguf(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parent = _hf_dir(tmp_path / "hf", Manifest(
        stage="base", method="gguf-dequantize", parent=Parent(str(source), "0" * 64),
        parameters={"dtype": "float32", "gguf_file": source.name}))
    assert parent_origin(inspect_checkpoint(parent)) == (
        "dequantized to float32 from the Q4_1 GGUF SmolLM2-135M-Instruct.Q4_1.gguf")
    plain = _hf_dir(tmp_path / "plain", Manifest(stage="sft", method="sft-full", parent=Parent(str(parent), "0" * 64)))
    assert parent_origin(inspect_checkpoint(plain)) == ""


def test_parameters_are_counted_from_the_weight_headers(tmp_path):
    assert param_count(inspect_checkpoint(_hf_dir(tmp_path / "hf"))) == 3 * 5 + 7
    assert param_count(inspect_checkpoint(_q4_1_gguf(tmp_path / "m.gguf"))) == 4 * 8


REPORTS = [("bnb-int8", 1.68, 1.0, "fail"), ("q4_k_m.gguf", 5.48, 10.0, "pass"),
           ("quick.gguf", 7.9, 10.0, "not checked (quick report)"), ("plain", 3.0, None, "")]


def _reports() -> list[Report]:
    return [Report(artifact=f"/a/{name}", parent="/a/parent", ppl_increase_pct=inc, max_ppl_increase=g,
                   gate_result=res, size_bytes=105_500_000, n_params=134_515_008,
                   size_vs_f16=105_500_000 / (2 * 134_515_008), size_vs_fp32=105_500_000 / (4 * 134_515_008),
                   parent_origin="dequantized to float32 from the Q4_1 GGUF x.gguf")
            for name, inc, g, res in REPORTS]


def test_the_table_gives_size_against_f16_and_fp32_and_the_gate():
    table = markdown_table(_reports())
    assert "| × f16 | × fp32 |" in table
    assert "| 0.39 | 0.20 |" in table  # 105.5 MB of a 134.5M-parameter model: 0.39x f16, 0.20x fp32
    assert "+≤1%: fail" in table and "+≤10%: pass" in table and "+≤10%: not checked (quick report)" in table
    assert "The parent was dequantized to float32 from the Q4_1 GGUF x.gguf." in table


def test_the_comparison_plot_draws_each_gate_and_colours_pass_and_fail(tmp_path, monkeypatch):
    from matplotlib.axes import Axes
    lines, bars = [], []
    real_hlines, real_bar = Axes.hlines, Axes.bar
    monkeypatch.setattr(Axes, "hlines", lambda self, y, *a, **kw: lines.append(y) or real_hlines(self, y, *a, **kw))
    monkeypatch.setattr(Axes, "bar", lambda self, x, h, *a, **kw: bars.append(kw.get("color")) or
                        real_bar(self, x, h, *a, **kw))
    out = plot_reports(_reports(), tmp_path / "summary.png")
    assert out.stat().st_size > 1000
    assert lines == [1.0, 10.0, 10.0]  # one dashed gate per gated artifact
    assert bars[0] == [report_render.FAIL_COLOR, report_render.PASS_COLOR, report_render.UNGATED_COLOR,
                       report_render.UNGATED_COLOR]


@pytest.mark.parametrize("i", range(len(REPORTS)))
def test_one_report_page_and_plot_show_the_gate(tmp_path, i):
    r = _reports()[i]
    page = r.to_markdown()
    assert f"quality gate (perplexity increase): {report_render.gate_text(r)}" in page
    assert "0.39× / 0.20×" in page and "dequantized to float32 from the Q4_1 GGUF" in page
    report_render.plot_report(r, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
