"""The memory planner against measured RSS: the default model through transformers on CPU, fp32.

    python bench/planner.py                      # default model, settings 1024x1 4096x2 8192x4
    python bench/planner.py --model PATH --settings 2048x1,2048x8 --json bench/planner.json

The default model's HF checkpoint comes from `hearth models prepare`. Each setting runs in a
fresh process, so every RSS baseline is clean: after imports and a warm-up forward of a tiny
model (runtime overhead), after loading the weights, after allocating the KV cache (a
transformers StaticCache of context x concurrency), and the peak RSS of one engine step of
`--chunk` tokens spread over the sequences (logits for every token), read from the kernel's
high-water mark (VmHWM) after resetting it. Prints planned vs measured and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hearth.clients.cmd_bench import write_json

MiB = 2**20


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def worker(model_dir: str, context: int, concurrency: int, chunk: int) -> dict:
    """Measure one setting in this (fresh) process and return planned and measured bytes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, StaticCache

    from hearth.runtime.planner import plan

    # Warm up on a tiny model first: the library code a forward pages in (and lazy imports)
    # belongs to the runtime overhead, not to the weights.
    tiny = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256)
    with torch.inference_mode():
        LlamaForCausalLM(tiny).eval()(torch.zeros(1, 8, dtype=torch.long))
    rss_base = _rss()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.inference_mode():  # weights may be mmapped from safetensors: touch every page
        model(torch.zeros(1, 1, dtype=torch.long), use_cache=False)
    rss_weights = _rss()

    cache = StaticCache(config=model.config, max_cache_len=context)
    per_seq = max(1, chunk // concurrency)
    vocab = model.config.vocab_size
    with torch.inference_mode():
        model(torch.zeros(concurrency, 1, dtype=torch.long), past_key_values=cache, use_cache=True)
        kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        rss_kv = _rss()
        ids = torch.randint(0, vocab, (concurrency, per_seq))
        positions = torch.arange(1, per_seq + 1)
        exact_peak = _reset_peak()
        t0 = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True, cache_position=positions)
        step_s = time.perf_counter() - t0
        peak = _peak_rss() if exact_peak else None
        del out
    peak = peak if peak is not None else _rss()  # without clear_refs: a lower bound

    p = plan(model_dir, "cpu", context, concurrency, "fp32", prefill_chunk=per_seq * concurrency)
    return {
        "context": context, "concurrency": concurrency, "chunk": per_seq * concurrency,
        "step_s": round(step_s, 3), "peak_exact": exact_peak,
        "planned": {"overhead": p.overhead_bytes, "weights": p.weights_bytes, "kv_cache": p.kv_cache_bytes,
                    "activations": p.activation_bytes, "total": p.total_bytes},
        "measured_rss": {"overhead": rss_base, "weights": rss_weights - rss_base, "kv_cache": rss_kv - rss_weights,
                         "activations": peak - rss_kv, "total": peak},
        "tensor_bytes": {"weights": param_bytes, "kv_cache": kv_bytes},
    }


def default_model_dir() -> Path:
    from hearth.runtime.registry import DEFAULT_MODEL, models_dir

    return models_dir() / DEFAULT_MODEL / "hf"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF checkpoint dir (default: the prepared default model)")
    ap.add_argument("--settings", default="1024x1,4096x2,8192x4", help="CONTEXTxCONCURRENCY,...")
    ap.add_argument("--chunk", type=int, default=512, help="tokens in the measured step")
    ap.add_argument("--json", default="bench/planner.json", help="where to write the results")
    ap.add_argument("--worker", nargs=4, metavar=("MODEL", "CONTEXT", "CONCURRENCY", "CHUNK"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        m, ctx, conc, chunk = args.worker
        print(json.dumps(worker(m, int(ctx), int(conc), int(chunk))))
        return 0

    model_dir = Path(args.model) if args.model else default_model_dir()
    if not (model_dir / "config.json").is_file():
        print(f"no HF checkpoint at {model_dir}.\n"
              f"Build the default model's checkpoint with `hearth models prepare`, or pass --model PATH.",
              file=sys.stderr)
        return 2
    settings = [tuple(int(x) for x in s.lower().split("x")) for s in args.settings.split(",")]

    results = []
    for context, concurrency in settings:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(model_dir), str(context),
               str(concurrency), str(args.chunk)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))

    print(f"model {model_dir}, fp32 on cpu; MiB; measured = RSS deltas, total = peak RSS")
    print(f"{'setting':>12} {'component':>12} {'planned':>9} {'measured':>9} {'diff':>7}")
    for r in results:
        setting = f"{r['context']}x{r['concurrency']}"
        for key in ("overhead", "weights", "kv_cache", "activations", "total"):
            plan_b, meas_b = r["planned"][key], r["measured_rss"][key]
            diff = (plan_b - meas_b) / meas_b * 100 if meas_b > 0 else float("nan")
            print(f"{setting:>12} {key:>12} {plan_b / MiB:9.1f} {meas_b / MiB:9.1f} {diff:+6.1f}%")
            setting = ""
    write_json(args.json, {"model": str(model_dir), "quant": "fp32", "device": "cpu", "results": results},
               print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
