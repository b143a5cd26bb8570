"""RLHF with PPO as InstructGPT describes it: a policy with a value head, per-token rewards with a KL penalty
to the reference policy, GAE advantages and the clipped surrogate objective. Written here in one file (TRL
1.16 ships no PPO trainer); its critic-free sibling is `hearth train rloo` (training/rloo.py).

    hearth train ppo --config training/recipes/ppo.yaml
    hearth train ppo --config training/recipes/ppo.yaml --resume max_steps=60

One step (one rollout batch):
  1. rollout: `prompts_per_step` prompts (a seeded shuffle, epoch after epoch), `samples_per_prompt` answers
     each, sampled from the policy at `temperature` (up to and including the first EOS);
  2. score each answer: the reward model's score of the whole chat, or the Python reward function;
  3. per-token reward r_t = −β·(log π(a_t) − log π_ref(a_t)), plus the score at the answer's last token;
  4. GAE(γ, λ) advantages from the value head's V(s_t), whitened over the batch; returns = A + V;
  5. `ppo_epochs` passes over shuffled minibatches: the clipped surrogate −min(ρA, clip(ρ, 1±ε)A) with
     ρ = π/π_old, plus `vf_coef` × the clipped value loss
     ½·max((V−R)², (V_old + clip(V−V_old, ±value_clip) − R)²);
  6. with `kl_target` set, β adapts (Ziegler et al. 2019): β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon).

The value head is one linear layer on the policy's last hidden state, not a separate value model
initialised from the reward model as InstructGPT did: one forward pass gives log-probs and values (half
the compute and memory of a second 135M..7B model, which matters on a 3090 or a CPU), and it works the
same when the reward is a Python function with no reward model to start from. It reads the hidden state
detached, so the value loss trains the head alone and cannot drag the policy (with the gradient flowing
into the shared trunk, the tiny test task's KL ran away even at β = 1); it starts at zero and has its own
learning rate (`value_learning_rate`), since a linear layer must learn far faster than the policy moves.

The reward is a reward-model checkpoint from `hearth train rm` (`reward_model: runs/rm`) or a Python callable
(`reward_function: mypkg.rewards:brevity`; training/rewards.py gives its contract and the prompt formats).
With LoRA the reference is the base with the adapter switched off; with `method: full` a frozen copy.

Output: a causal LM in HF layout (stage "rlhf", method "ppo"; a LoRA adapter merged in and kept under
adapter/), the reward pinned in the manifest. metrics.jsonl logs, per step, `reward` (mean score), `kl`
(summed over an answer's tokens, mean over answers), `policy_loss`, `value_loss`, `clip_fraction`, `entropy`
and `beta`. A checkpoint holds the trainable weights and the value head (safetensors), the optimizer, β and
the step; each step's sampling is seeded from (seed, step), so a resumed run draws what the killed one would.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hearth.training.common import (StepClock, TrainingConfigError, bundled, config_to_dict, gptqmodel_only_if_needed,
                                    peak_memory_mb, pick_precision, plot_metrics, progress, say, stage_manifest,
                                    warmup_count)
from hearth.training.rewards import check_reward_source, import_reward_function, load_prompts, reward_info
from hearth.training.trl_support import (check_config, load_tokenizer, lora_config, merged_policy, prepare_run,
                                         publish_model, resolve_device, say_speed)

WEIGHTS = "trainable.safetensors"  # in a checkpoint: the trainable policy weights and value_head.*
OPTIMIZER = "optimizer.pt"
PLOTTED = ("reward", "kl", "policy_loss", "value_loss", "clip_fraction", "entropy")


@dataclass
class Config:
    """The ppo recipe (training/recipes/ppo.yaml mirrors it)."""

    output_dir: str
    """Where the trained policy, checkpoints/, metrics.jsonl and loss.png go."""
    model: str = "smollm2-135m-instruct"
    """The starting policy (a checkpoint dir or a registered model name); also the KL reference."""
    reward_model: str | None = None
    """A reward-model checkpoint (the rm stage's output). Exactly one of reward_model / reward_function."""
    reward_function: str | None = None
    """A Python reward callable as "module:function" (training/rewards.py gives its contract)."""
    prompts: str = "training/data/preferences.jsonl"
    """JSONL of prompts: "prompt" (text or messages) or "messages" per record; other fields are ignored."""
    max_prompt_length: int = 512
    """Prompts longer than this (tokens, chat template applied) are left out, with a count."""
    prompts_per_step: int = 2
    """Prompts per rollout batch (one step)."""
    samples_per_prompt: int = 4
    """Answers sampled per prompt: a step trains on prompts_per_step * samples_per_prompt answers."""
    max_completion_length: int = 64
    temperature: float = 1.0
    beta: float = 0.05
    """KL coefficient: each answer token's reward loses beta * (log pi - log pi_ref). 0 turns the penalty off."""
    kl_target: float | None = None
    """With a value, beta adapts towards this KL per answer (summed over tokens); null keeps beta fixed."""
    kl_horizon: int = 10000
    """Answers over which the adaptive beta closes the gap to kl_target (Ziegler et al.'s horizon)."""
    gamma: float = 1.0
    """GAE discount per token."""
    lam: float = 0.95
    """GAE lambda: 1 is Monte Carlo returns minus the value, 0 one-step TD errors."""
    whiten_advantages: bool = True
    """Normalise the batch's advantages to mean 0, variance 1 (over answer tokens)."""
    epsilon: float = 0.2
    """PPO clip range of the probability ratio pi / pi_old."""
    value_clip: float = 0.2
    """How far a value may move from its rollout value before the value loss clips it."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss (it trains the value head only)."""
    value_learning_rate: float = 1e-3
    """AdamW learning rate of the value head (a linear layer learns from zero far faster than the policy moves)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    minibatch_size: int = 4
    """Answers per optimizer update within a pass."""
    gradient_accumulation_steps: int = 1
    """Forward/backward slices per minibatch (less memory, same update)."""
    max_grad_norm: float = 1.0
    max_steps: int = 40
    """Rollout batches to train on."""
    learning_rate: float = 1e-5
    warmup_steps: float = 0
    """Linear warmup over steps: below 1 a fraction of max_steps, else a number of steps."""
    weight_decay: float = 0.0
    method: Literal["full", "lora"] = "lora"
    """lora: train LoRA adapters (merged into the output, also kept under adapter/); full: every weight."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    gradient_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str = "auto"
    """"auto" (CUDA when present), "cpu" or "cuda"."""
    seed: int = 0
    save_every: int = 10
    """Write a resumable checkpoint every this many steps; the last step is always checkpointed."""
    keep_checkpoints: int = 2
    logging_steps: int = 1

    def __post_init__(self) -> None:
        self.prompts = bundled(self.prompts)
        check_reward_source(self.reward_model, self.reward_function)
        for name in ("beta", "vf_coef", "max_grad_norm", "value_clip", "value_learning_rate"):
            if getattr(self, name) < 0:
                raise TrainingConfigError(f"{name} must be >= 0; got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise TrainingConfigError(f"{name} must be in [0, 1]; got {getattr(self, name)}")
        if not 0.0 < self.epsilon < 1.0:
            raise TrainingConfigError(f"epsilon must be in (0, 1); got {self.epsilon}")
        if self.temperature <= 0:
            raise TrainingConfigError(f"temperature must be > 0; got {self.temperature}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise TrainingConfigError(f"kl_target must be > 0 (or null for a fixed beta); got {self.kl_target}")
        check_config(self, ("prompts_per_step", "samples_per_prompt", "max_prompt_length", "max_completion_length",
                            "ppo_epochs", "minibatch_size", "gradient_accumulation_steps", "kl_horizon", "max_steps",
                            "lora_r", "save_every", "logging_steps"))
        if self.gradient_accumulation_steps > self.minibatch_size:
            raise TrainingConfigError(f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) must be <= "
                                      f"minibatch_size ({self.minibatch_size}): it slices a minibatch")


# ----------------------------------------------------------------------------- the algorithm (tensors only)


def token_rewards(scores, logp, ref_logp, mask, beta: float):
    """(per-token rewards, per-token KL), each (B, T): −beta·KL at every answer token, plus the answer's
    score at its last token. `mask` (B, T) is 1 on answer tokens (a prefix of each row)."""
    import torch

    kl = (logp - ref_logp) * mask  # (B, T)
    rewards = -beta * kl
    last = mask.sum(1).long() - 1  # (B,) index of each answer's last token
    rewards[torch.arange(len(last)), last] += scores
    return rewards, kl


def gae(rewards, values, mask, gamma: float, lam: float):
    """(advantages, returns), each (B, T), by generalised advantage estimation: δ_t = r_t + γV_{t+1} − V_t,
    A_t = δ_t + γλA_{t+1}, with V = 0 after an answer's last token; returns = A + V."""
    import torch

    values, rewards = values * mask, rewards * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def whiten(x, mask):
    """x shifted and scaled to mean 0, variance 1 over the positions where mask is 1 (0 elsewhere)."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * (var + 1e-8).rsqrt() * mask


def clipped_losses(logp, old_logp, advantages, values, old_values, returns, mask, epsilon: float,
                   value_clip: float, denominator=None):
    """(policy loss, value loss, clip fraction): PPO's clipped surrogate max(−ρA, −clip(ρ, 1−ε, 1+ε)A) and the
    clipped value loss ½·max((V − R)², (V_old + clip(V − V_old, ±value_clip) − R)²), each summed over the
    answer tokens and divided by `denominator` (default: their count, a mean). All inputs (B, T)."""
    import torch

    n = mask.sum() if denominator is None else denominator
    ratio = torch.exp(logp - old_logp)
    policy = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - epsilon, 1 + epsilon))
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    value = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    clipped = ((ratio - 1).abs() > epsilon).float()
    return (policy * mask).sum() / n, (value * mask).sum() / n, (clipped * mask).sum() / n


def adapt_beta(beta: float, kl: float, target: float, n_answers: int, horizon: int) -> float:
    """Ziegler et al.'s adaptive KL controller: β grows when the KL is above target and shrinks below it."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_answers / horizon)


# ----------------------------------------------------------------------------- model pieces


def answer_logprobs(model, value_head, seq, attn, n_prompt: int, temperature: float):
    """(log π(a_t), V(s_t) or None, entropy), each (B, T), for the answer tokens seq[:, n_prompt:] under the
    sampling temperature; the positions follow the attention mask (left-padded prompts), as in generate."""
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=seq, attention_mask=attn, position_ids=pos, output_hidden_states=value_head is not None)
    logits = out.logits[:, n_prompt - 1:-1].float() / temperature  # (B, T, V): position t predicts answer token t
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, seq[:, n_prompt:, None]).squeeze(-1)  # (B, T)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (B, T)
    values = None
    if value_head is not None:
        # detached: the value loss trains the head alone, so it cannot pull the policy's trunk around
        values = value_head(out.hidden_states[-1][:, n_prompt - 1:-1].detach().float()).squeeze(-1)  # (B, T)
    return logp, values, entropy


def answer_mask(answers, eos_id: int):
    """(B, T) 1.0 on each answer's tokens up to and including its first EOS, 0.0 on the padding after it."""
    is_eos = (answers == eos_id).int()
    return ((is_eos.cumsum(1) - is_eos) == 0).float()


def sample(model, tok, texts: list[str], sampling, device: str):
    """(token ids (B, P + T), answer mask (B, T), P, prompt attention mask (B, P), answer texts): `texts` (chat
    templates already applied) left-padded and continued by `model` under `sampling` (a GenerationConfig);
    the answers are cut to their longest real length."""
    import torch

    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(device)
    n_prompt = enc.input_ids.shape[1]
    with torch.no_grad():
        seq = model.generate(**enc, generation_config=sampling)  # (B, P + T)
    mask = answer_mask(seq[:, n_prompt:], tok.eos_token_id)  # (B, T)
    width = int(mask.sum(1).max())
    seq, mask = seq[:, :n_prompt + width], mask[:, :width]
    answers = tok.batch_decode([s[:int(m.sum())] for s, m in zip(seq[:, n_prompt:], mask)], skip_special_tokens=True)
    return seq, mask, n_prompt, enc.attention_mask, answers


def sampling_config(tok, max_new_tokens: int, temperature: float):
    """Plain sampling at `temperature` (no top-k, no top-p), so the samples follow the log-probs PPO computes."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0,
                            top_p=1.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


def prompt_order(n: int, seed: int, step: int, per_step: int) -> list[int]:
    """The prompt indices of one step: a seeded shuffle per pass over the prompts, read `per_step` at a time."""
    from hearth.training.data import epoch_order

    first = (step - 1) * per_step
    return [epoch_order(n, seed, i // n)[i % n] for i in range(first, first + per_step)]


# ----------------------------------------------------------------------------- run


def run(config: Config, resume: bool = False) -> Path:
    """Optimise the policy against the reward with PPO; returns the output checkpoint dir."""
    with gptqmodel_only_if_needed(config.model):
        return _run(config, resume)


def _run(config: Config, resume: bool) -> Path:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from hearth.runtime.registry import resolve_model
    from hearth.training.rm import RewardModel

    cfg = config
    base = resolve_model(cfg.model, prefer="hf")
    reward = reward_info(cfg.reward_model, cfg.reward_function)  # checks the rm checkpoint before any work
    device = resolve_device(cfg.device)
    precision = pick_precision(device, cfg.precision)
    tok = load_tokenizer(base)

    prompts, rendered, loaded = [], [], load_prompts(cfg.prompts)
    for p in loaded:
        text = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        if len(tok(text, add_special_tokens=False).input_ids) <= cfg.max_prompt_length:
            prompts.append(p)
            rendered.append(text)
    if not prompts:
        raise TrainingConfigError(f"max_prompt_length: every prompt in {cfg.prompts} is longer than "
                                  f"{cfg.max_prompt_length} tokens")
    dropped = len(loaded) - len(prompts)
    say(f"{len(prompts)} prompts from {cfg.prompts}" + (f" ({dropped} longer than max_prompt_length left out)"
                                                        if dropped else ""))

    if cfg.reward_model is not None:
        scorer = RewardModel.load(reward["reward_model"]["path"], device=device)

        def score(prompts, completions):
            return scorer.score_chats([p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, completions)])
    else:
        score = import_reward_function(cfg.reward_function)

    run_dir, start, log = prepare_run(cfg.output_dir, cfg.keep_checkpoints, resume)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32).to(device)
    reference = None
    if cfg.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg, "CAUSAL_LM"))
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if cfg.method == "lora":
            model.enable_input_require_grads()
    value_head = torch.nn.Linear(model.config.hidden_size, 1).to(device)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    trainable.update({f"value_head.{n}": p for n, p in value_head.named_parameters()})
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in trainable.items() if not n.startswith("value_head.")], "lr": cfg.learning_rate},
         {"params": list(value_head.parameters()), "lr": cfg.value_learning_rate}], weight_decay=cfg.weight_decay)
    beta = cfg.beta
    if start is not None:
        saved = load_file(start.path / WEIGHTS, device=device)
        with torch.no_grad():
            for name, tensor in saved.items():
                trainable[name].copy_(tensor)
        optimizer.load_state_dict(torch.load(start.path / OPTIMIZER, map_location=device, weights_only=True))
        beta = start.state["beta"]
    first_step = start.step + 1 if start else 1

    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                              enabled=precision != "fp32" and device.startswith("cuda"))
    scaler = torch.amp.GradScaler(enabled=precision == "fp16" and device.startswith("cuda"))
    sampling = sampling_config(tok, cfg.max_completion_length, cfg.temperature)
    warmup = warmup_count(cfg.warmup_steps, cfg.max_steps)
    per_step = cfg.prompts_per_step * cfg.samples_per_prompt

    def checkpoint(step: int) -> None:
        def fill(tmp: Path) -> None:
            save_file({n: p.detach().contiguous().cpu() for n, p in trainable.items()}, tmp / WEIGHTS)
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)

        run_dir.save_checkpoint(step, fill, state={"seed": cfg.seed, "beta": beta})

    bar = progress(cfg.max_steps, f"ppo-{cfg.method}", initial=first_step - 1)
    tokens, t0 = 0, time.perf_counter()
    for step in range(first_step, cfg.max_steps + 1):
        clock = StepClock()
        for group, lr in zip(optimizer.param_groups, (cfg.learning_rate, cfg.value_learning_rate)):
            group["lr"] = lr * min(1.0, step / warmup) if warmup else lr
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # this step's sampling and minibatch order
        idx = [i for i in prompt_order(len(prompts), cfg.seed, step, cfg.prompts_per_step)
               for _ in range(cfg.samples_per_prompt)]
        batch_prompts = [prompts[i] for i in idx]

        # 1-2. rollout and scores
        model.eval()
        with autocast:
            seq, mask, n_prompt, prompt_attn, answers = sample(model, tok, [rendered[i] for i in idx], sampling, device)
        attn = torch.cat([prompt_attn, mask.long()], 1)  # (B, P + T)
        scores = torch.tensor(score(prompts=batch_prompts, completions=answers), dtype=torch.float32, device=device)
        tokens += int(mask.sum())

        # 3-4. old log-probs, values and the reference's log-probs; per-token rewards; GAE
        with torch.no_grad(), autocast:
            old_logp, old_values, entropy = answer_logprobs(model, value_head, seq, attn, n_prompt, cfg.temperature)
            if reference is None:
                with model.disable_adapter():
                    ref_logp, _, _ = answer_logprobs(model, None, seq, attn, n_prompt, cfg.temperature)
            else:
                ref_logp, _, _ = answer_logprobs(reference, None, seq, attn, n_prompt, cfg.temperature)
        rewards, kl = token_rewards(scores, old_logp, ref_logp, mask, beta)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)

        # 5. PPO epochs over minibatches
        model.train()
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0}
        updates = 0
        for _ in range(cfg.ppo_epochs):
            for mb in torch.randperm(per_step, device=device).split(cfg.minibatch_size):
                optimizer.zero_grad(set_to_none=True)
                n_tokens = mask[mb].sum()
                for piece in mb.tensor_split(min(cfg.gradient_accumulation_steps, len(mb))):
                    with autocast:
                        logp, values, _ = answer_logprobs(model, value_head, seq[piece], attn[piece], n_prompt,
                                                          cfg.temperature)
                    losses = clipped_losses(logp, old_logp[piece], advantages[piece], values, old_values[piece],
                                            returns[piece], mask[piece], cfg.epsilon, cfg.value_clip, n_tokens)
                    scaler.scale(losses[0] + cfg.vf_coef * losses[1]).backward()
                    for key, value in zip(sums, losses):
                        sums[key] += float(value.detach())
                scaler.unscale_(optimizer)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                updates += 1

        # 6. the KL coefficient, metrics, checkpoint
        mean_kl = float(kl.sum(1).mean())
        record = {"reward": float(scores.mean()), "kl": mean_kl, **{k: v / updates for k, v in sums.items()},
                  "entropy": float((entropy * mask).sum() / mask.sum()), "beta": beta,
                  "completion_length": float(mask.sum(1).mean()), "learning_rate": optimizer.param_groups[0]["lr"]}
        if cfg.kl_target is not None:
            beta = adapt_beta(beta, mean_kl, cfg.kl_target, per_step, cfg.kl_horizon)
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            log.log(step=step, **record, **clock.read())
        bar.set_postfix({"reward": f"{record['reward']:.4g}", "kl": f"{mean_kl:.3g}"}, refresh=False)
        bar.update(1)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            checkpoint(step)
    bar.close()
    seconds = time.perf_counter() - t0

    records = [r for r in log.read() if "reward" in r]
    k = max(1, len(records) // 4)  # first and last quarter of the run, to see the trend past sampling noise
    metrics: dict[str, Any] = {"steps": cfg.max_steps, "prompts": len(prompts)}
    if records:
        metrics["reward_first"] = sum(r["reward"] for r in records[:k]) / k
        metrics["reward_last"] = sum(r["reward"] for r in records[-k:]) / k
        metrics["kl_last"] = sum(r["kl"] for r in records[-k:]) / k
        say(f"mean reward {metrics['reward_first']:.3f} (first {k} steps) -> {metrics['reward_last']:.3f} "
            f"(last {k}), KL to reference {metrics['kl_last']:.4f}")
    plot_metrics(run_dir.metrics, run_dir.plot, keys=PLOTTED,
                 title="PPO: reward, KL to the reference, losses, clipped share, entropy")

    policy, adapter_dir = merged_policy(model, cfg.method == "lora", run_dir)  # plain causal LM (+ adapter/)
    mem = peak_memory_mb()
    metrics.update(tokens_per_s=tokens / max(seconds, 1e-9), **mem)
    params = {k: v for k, v in config_to_dict(cfg).items() if k not in ("output_dir", "reward_model")}
    params.update(reward, precision=precision)
    manifest = stage_manifest("rlhf", "ppo", base, params, data_files=[cfg.prompts], metrics=metrics)
    publish_model(run_dir, policy, tok, manifest, adapter_dir)
    say_speed(tokens, seconds, mem)
    say(f"policy written to {run_dir.out}")
    return run_dir.out
