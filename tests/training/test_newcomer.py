"""The newcomer's path through the training commands (issue 21): bundled data found from any folder, an
adapter folder evaluated on its base, one recipe vocabulary (old names still work, with a warning),
`hearth train STAGE --help` listing the fields, the last SFT step checkpointed for --resume, temps of a
live run left alone, labelled plots, and a quiet, labelled TRL run from outside the checkout.

    python -m pytest tests/training/test_newcomer.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hearth.training import dpo, eval as ev, ppo, pretrain, rlhf, rloo, rm, sft, tokenizer
from hearth.training.common import RunDir, TrainingConfigError, load_config, plot_panels
from hearth.training.self_instruct import SelfInstructConfig

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "training" / "recipes"
STAGE_OF = {"dpo": dpo, "rm": rm, "ppo": ppo, "rloo": rloo, "rlhf": rlhf, "sft_lora": sft, "sft_full": sft,
            "sft_qlora": sft, "pretrain_continue": pretrain, "pretrain_tiny": pretrain, "tokenizer_extend": tokenizer,
            "tokenizer_train": tokenizer}


def _data_paths(cfg) -> list[str]:
    if isinstance(cfg, pretrain.Config):
        return [s.path for s in cfg.sources]
    if isinstance(cfg, tokenizer.Config):
        return list(cfg.data) + list(cfg.compare.values())
    if isinstance(cfg, (ppo.Config, rloo.Config)):
        return [cfg.prompts]
    if isinstance(cfg, rlhf.Config):
        return [cfg.preferences]
    return list(cfg.data) if isinstance(cfg.data, list) else [cfg.data]


# ----------------------------------------------------------------------------- bundled data from any folder


@pytest.mark.parametrize("recipe", sorted(STAGE_OF))
def test_every_recipe_finds_its_bundled_data_from_another_folder(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: training/data/... does not exist here
    cfg = load_config(STAGE_OF[recipe].Config, RECIPES / f"{recipe}.yaml")
    paths = _data_paths(cfg)
    assert paths and all(Path(p).is_file() and Path(p).is_absolute() for p in paths), paths


def test_the_readme_recipe_paths_work_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(dpo.Config, "training/recipes/dpo.yaml")  # as the README writes it
    assert cfg.output_dir == "runs/dpo" and Path(cfg.data).is_file()


def test_self_instruct_and_eval_find_bundled_files_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = SelfInstructConfig(teacher="http://127.0.0.1:1", model="m", n=1, seeds="training/data/seed_tasks.jsonl")
    assert Path(cfg.seeds).is_file()
    assert Path(ev.MCConfig(model="m", data="training/data/mc_exam.jsonl").data).is_file()
    (tmp_path / "mine.jsonl").write_text("{}\n")  # a file of the user's own, relative to where they are
    assert Path(SelfInstructConfig(teacher="http://127.0.0.1:1", model="m", n=1, seeds="mine.jsonl").seeds) == \
        tmp_path / "mine.jsonl"


def test_dpo_recipe_comment_names_the_readme_chain_output():
    text = (RECIPES / "dpo.yaml").read_text()
    assert "model=runs/sft-merged" in text and "model=runs/sft." not in text and "model=runs/sft\n" not in text


# ----------------------------------------------------------------------------- one vocabulary


def test_old_key_names_still_work_with_a_warning(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("grad_accum: 3\nwarmup: 2\ntarget_modules: [q_proj]\nsave_every: 7\n")
    cfg = load_config(sft.Config, old)
    assert (cfg.gradient_accumulation_steps, cfg.warmup_steps, cfg.lora_target_modules) == (3, 2, ["q_proj"])
    err = capsys.readouterr().err
    assert "'grad_accum' is now called 'gradient_accumulation_steps'" in err and "'warmup'" in err

    trl_old = tmp_path / "trl.yaml"
    trl_old.write_text("output_dir: o\nlora: false\nsave_steps: 4\n")
    cfg = load_config(dpo.Config, trl_old, {"grad_accum": 2})
    assert (cfg.method, cfg.save_every, cfg.gradient_accumulation_steps) == ("full", 4, 2)
    assert "'lora: true|false' is now 'method: lora|full'" in capsys.readouterr().err

    both = tmp_path / "both.yaml"
    both.write_text("output_dir: o\nsave_steps: 4\nsave_every: 5\n")
    with pytest.raises(TrainingConfigError, match="save_every.*save_steps"):
        load_config(rm.Config, both)


def test_every_stage_speaks_one_vocabulary():
    from dataclasses import fields

    for module in (sft, pretrain, dpo, rm, ppo, rloo):
        names = {f.name for f in fields(module.Config)}
        assert {"gradient_accumulation_steps", "save_every", "warmup_steps"} <= names, module.__name__
        assert not names & {"grad_accum", "save_steps", "warmup", "lora", "target_modules"}, module.__name__
    for module in (sft, dpo, rm, ppo, rloo):
        assert "method" in {f.name for f in fields(module.Config)}


def test_train_stage_help_lists_the_recipe_fields_with_their_docs(capsys):
    from hearth.clients.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "sft", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "recipe fields" in out and "gradient_accumulation_steps = 1" in out
    assert "Micro-batches per optimizer step" in out and "--verbose" in out
    with pytest.raises(SystemExit):
        main(["train", "dpo", "--help"])
    assert "beta = 0.1" in capsys.readouterr().out


def test_ppo_plot_labels_reward_and_kl_by_name():
    assert plot_panels(("reward", "kl")) == [("reward", ["reward"]), ("kl", ["kl"])]
    assert plot_panels(("loss", "eval_loss", "rewards/margins")) == [
        ("loss", ["loss", "eval_loss"]), ("rewards/margins", ["rewards/margins"])]


# ----------------------------------------------------------------------------- temps of another live run


def test_a_run_folder_removes_dead_writers_temps_and_keeps_live_ones(tmp_path):
    from hearth.runtime.fileio import make_temp

    out = tmp_path / "run"
    live = make_temp(out / "checkpoints" / "step-5", is_dir=True)  # this process: alive
    code = ("import sys; from hearth.runtime.fileio import make_temp; from pathlib import Path; "
            "make_temp(Path(sys.argv[1]) / 'final', is_dir=True)")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=60)  # its owner exits
    dead = [p for p in out.iterdir() if p.name.startswith(".final")]
    assert len(dead) == 1
    RunDir(out)
    assert live.is_dir() and not dead[0].exists()


# ----------------------------------------------------------------------------- sft: the last step checkpointed


def _qa(tmp_path: Path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n"
                            for w in ("one", "two", "three", "four", "five", "six")))
    return path


def test_sft_resume_continues_after_a_final_step_that_is_not_a_save_step(tiny_llama, tmp_path, capsys):
    out = tmp_path / "sft"
    base = dict(model=str(tiny_llama), data=[str(_qa(tmp_path))], output_dir=str(out), method="lora",
                batch_size=2, max_length=48, save_every=50, eval_fraction=0.0, merge=False)
    sft.run(sft.Config(**base, max_steps=2))
    assert (out / "checkpoints" / "step-2").is_dir()
    sft.run(sft.Config(**base, max_steps=3), resume=True)
    assert "resuming from" in capsys.readouterr().err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # step 3 followed step 2; nothing restarted from step 1


# ----------------------------------------------------------------------------- eval of an adapter folder


def test_eval_mc_scores_a_lora_adapter_folder_on_its_base(tiny_llama, tmp_path):
    out = tmp_path / "sft-lora"
    sft.run(sft.Config(model=str(tiny_llama), data=[str(_qa(tmp_path))], output_dir=str(out), method="lora",
                       batch_size=2, max_length=48, max_steps=2, learning_rate=5e-2, eval_fraction=0.0,
                       merge=False))
    assert not list(out.glob("model*.safetensors")) and (out / "adapter" / "adapter_config.json").is_file()
    exam = tmp_path / "exam.jsonl"
    exam.write_text("".join(json.dumps({"subject": "s", "question": f"Pick {L}.", "A": "a", "B": "b", "C": "c",
                                        "D": "d", "answer": L}) + "\n" for L in "ABCD"))
    res = ev.multiple_choice(ev.MCConfig(model=str(out), data=str(exam), shots=0))

    merged = tmp_path / "merged"  # the reference: the same adapter merged and saved as a checkpoint
    sft.merge_adapter(tiny_llama, out / "adapter", qlora=False).save_pretrained(merged)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_llama / f).is_file():
            (merged / f).write_bytes((tiny_llama / f).read_bytes())
    ref = ev.multiple_choice(ev.MCConfig(model=str(merged), data=str(exam), shots=0, backend="transformers"))
    for a, b in zip(res.predictions, ref.predictions):
        assert a.probs == pytest.approx(b.probs, abs=1e-3)
    plain = ev.multiple_choice(ev.MCConfig(model=str(tiny_llama), data=str(exam), shots=0, backend="transformers"))
    assert max(abs(a.probs[k] - b.probs[k]) for a, b in zip(plain.predictions, ref.predictions) for k in "ABCD") > 1e-3


# ----------------------------------------------------------------------------- a quiet, labelled TRL run


def test_dpo_from_outside_the_checkout_is_quiet_labelled_and_prints_its_output(tiny_llama, tmp_path):
    out = tmp_path / "dpo"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)
    p = subprocess.run([sys.executable, "-m", "hearth.clients.cli", "train", "dpo", "--config",
                        str(RECIPES / "dpo.yaml"), f"model={tiny_llama}", f"output_dir={out}", "max_steps=2",
                        "batch_size=2", "max_length=64", "eval_fraction=0.1", "save_every=100"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    both = p.stdout + p.stderr
    assert p.returncode == 0, both[-3000:]
    assert p.stdout.strip().splitlines() == [str(out.resolve())]  # stdout: the output path alone
    assert "GPT-QModel" not in both and "Setting accelerator to CPU" not in both
    assert "Enum subclass" not in both and "FutureWarning" not in both and "{'loss'" not in both
    assert "dpo-lora" in p.stderr and "margin=" in p.stderr  # hearth's labelled bar with the key metrics
    assert "evaluating the final policy on the 5 held-out pairs" in p.stderr
    assert (out / "hearth.json").is_file() and (out / "checkpoints" / "step-2").is_dir()


# ----------------------------------------------------------------------------- self-instruct speaks while it works


def test_self_instruct_from_another_folder_shows_its_progress_without_a_terminal(tmp_path, monkeypatch, capsys):
    from hearth.clients.cli import main
    from tests.training.test_self_instruct import GOOD, _block, fake_openai

    monkeypatch.chdir(tmp_path)
    replies = iter([_block(1, *GOOD[0]), _block(1, *GOOD[2])])
    with fake_openai(lambda body: next(replies)) as (url, _):
        rc = main(["data", "self-instruct", "--seeds", "training/data/seed_tasks.jsonl", "--teacher", url,
                   "--model", "m", "--n", "2", "--batch-size", "1", "-o", "gen.jsonl"])
    captured = capsys.readouterr()
    assert rc == 0 and len((tmp_path / "gen.jsonl").read_text().splitlines()) == 2
    assert "self-instruct: asking m at" in captured.err  # said before the first (possibly minutes-long) request
    assert "self-instruct: 100%" in captured.err and "2/2" in captured.err  # the bar, though stderr is no terminal
