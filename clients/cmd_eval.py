"""`hearth eval`: perplexity, multiple-choice exams and LLM-as-judge (hearth.training.eval).

    hearth eval ppl --model CKPT --text FILE [--window 1024 --stride 512] [--json] [--save]
    hearth eval mc --model CKPT [--data FILE.jsonl] [--shots 3] [--json] [--output result.json] [--save]
    hearth eval mc --model runs/sft-lora         # a LoRA adapter (sft merge=false): scored merged into its base
    hearth eval judge --model-url URL --model M --judge-url URL --judge-model J [--data FILE.jsonl]

`--save` merges the scores into the checkpoint's hearth.json metrics (eval_ppl / eval_mc).
"""

from __future__ import annotations

import argparse
import json
import sys


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint path (HF directory, GGUF, or a LoRA adapter folder: "
                                                  "scored on its base) or registered name")
    p.add_argument("--backend", default="auto", choices=["auto", "transformers", "llamacpp"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (transformers); cuda offloads llama.cpp")
    p.add_argument("--dtype", default="auto", help="transformers: auto, float32, bfloat16, float16")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--save", action="store_true", help="write the scores into the model's hearth.json")
    _verbose(p)


def _verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="also show the libraries' notices, warnings and per-file progress bars")


def _quiet(args: argparse.Namespace) -> None:
    from hearth.runtime.quiet import quiet_libraries

    quiet_libraries(verbose=args.verbose)  # before torch and transformers are imported


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate a model: perplexity, multiple choice, LLM-as-judge",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = ev.add_subparsers(dest="eval_command", metavar="KIND")
    kinds.required = True

    ppl = kinds.add_parser("ppl", help="perplexity on a text file, over sliding windows")
    _model_options(ppl)
    ppl.add_argument("--text", required=True, help="UTF-8 text file")
    ppl.add_argument("--window", type=int, default=1024, help="tokens per window (default 1024)")
    ppl.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default window/2)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    ppl.set_defaults(func=run_ppl)

    mc = kinds.add_parser("mc", help="C-Eval / MMLU style multiple-choice accuracy per subject")
    _model_options(mc)
    mc.add_argument("--data", default=None, help="questions JSONL (default: the bundled exam)")
    mc.add_argument("--shots", type=int, default=3, help="solved dev examples per prompt (default 3)")
    mc.add_argument("--subjects", default=None, help="comma-separated subjects to score (default: all)")
    mc.add_argument("--limit", type=int, default=None, help="at most N questions per subject")
    mc.add_argument("--context", type=int, default=2048, help="longest prompt in tokens (default 2048)")
    mc.add_argument("--output", default=None, help="write the full result (per-question probabilities) as JSON")
    mc.set_defaults(func=run_mc)

    j = kinds.add_parser("judge", help="pairwise LLM-as-judge against reference answers (both orders)")
    j.add_argument("--model-url", required=True, help="OpenAI-compatible server of the candidate")
    j.add_argument("--model", required=True, help="candidate model name on that server")
    j.add_argument("--judge-url", required=True, help="OpenAI-compatible server of the judge")
    j.add_argument("--judge-model", required=True)
    j.add_argument("--data", default=None, help="BELLE-style eval set JSONL (default: the bundled set)")
    j.add_argument("--api-key", default=None, help="candidate server key (default $OPENAI_API_KEY)")
    j.add_argument("--judge-api-key", default=None, help="judge server key (default: --api-key)")
    j.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    j.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    j.add_argument("--max-retries", type=int, default=3, help="retries per request with backoff (default 3)")
    j.add_argument("--limit", type=int, default=None, help="only the first N questions")
    j.add_argument("--answer-max-tokens", type=int, default=512)
    j.add_argument("--judge-max-tokens", type=int, default=512)
    j.add_argument("--temperature", type=float, default=0.0, help="candidate's sampling temperature")
    j.add_argument("--output", default=None, help="write answers, judge replies and verdicts as JSON")
    j.add_argument("--json", action="store_true", help="print the scores as JSON")
    _verbose(j)
    j.set_defaults(func=run_judge)


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False)
    print()


def run_ppl(args: argparse.Namespace) -> int:
    _quiet(args)
    from hearth.training.eval import PplConfig, perplexity

    res = perplexity(PplConfig(model=args.model, text=args.text, window=args.window, stride=args.stride,
                               backend=args.backend, device=args.device, dtype=args.dtype, threads=args.threads,
                               max_tokens=args.max_tokens, save=args.save))
    if args.json:
        _print_json(res.to_dict())
    else:
        print(f"perplexity {res.ppl:.4f}  (mean NLL {res.nll:.4f} nats over {res.tokens} tokens, "
              f"{res.windows} windows of {res.window}, stride {res.stride}, {res.seconds:.1f}s)")
    return 0


def run_mc(args: argparse.Namespace) -> int:
    _quiet(args)
    from hearth.training.eval import MCConfig, format_mc_table, multiple_choice

    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    res = multiple_choice(MCConfig(model=args.model, data=args.data, shots=args.shots, subjects=subjects,
                                   limit=args.limit, backend=args.backend, device=args.device, dtype=args.dtype,
                                   threads=args.threads, context=args.context, save=args.save,
                                   output=args.output))
    if args.json:
        _print_json(res.summary())
    else:
        print(format_mc_table(res))
    return 0


def run_judge(args: argparse.Namespace) -> int:
    _quiet(args)
    from hearth.training.eval import JudgeConfig, judge
    from hearth.training.eval_judge import format_judge_table

    res = judge(JudgeConfig(model_url=args.model_url, model=args.model, judge_url=args.judge_url,
                            judge_model=args.judge_model, data=args.data, api_key=args.api_key,
                            judge_api_key=args.judge_api_key, concurrency=args.concurrency,
                            timeout_s=args.timeout, max_retries=args.max_retries, limit=args.limit,
                            answer_max_tokens=args.answer_max_tokens, judge_max_tokens=args.judge_max_tokens,
                            temperature=args.temperature, output=args.output))
    if args.json:
        _print_json(res.summary())
    else:
        print(format_judge_table(res))
    return 0
