"""Offline training of the organism trio: SFT base, GRPO RLVR twin, and an SFT-continuation control.

* **base**: supervised fine-tuning on ``answer N<|im_end|>`` (loss on response tokens only), stopped at the
  first validation check with teacher-forced greedy accuracy >= ``sft_stop_acc``. Stopping mid-rise leaves
  the base uncertain but with broad coverage, which is what RLVR then sharpens.
* **rlvr**: GRPO from the base. Per step ``rl_prompts`` prompts x ``rl_group`` samples at temperature 1,
  reward = :func:`lens.organism.task.verify`, advantages normalised within each group, token-level
  policy-gradient loss (one on-policy update per batch, so the PPO ratio is 1), no KL term.
* **control**: the base trained further with SFT for exactly as many optimizer updates as GRPO made.

Everything runs on CPU with fixed seeds and a fixed thread count, so a seed reproduces bit-identical
weights on the same machine.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lens.errors import ConfigError
from lens.organism.model import (
    Encoder,
    TinyConfig,
    build_model,
    build_tokenizer,
    config_dict,
    save_folder,
    suppress_ids,
)
from lens.organism.task import HELDOUT_SEED, TRAIN_SEED_OFFSET, Sample, generate, heldout, validation, verify


@dataclass(frozen=True)
class OrganismTask:
    """What the trainer needs of a task: its tokenizer, encoder and item streams.

    Attributes:
        name: ``"image"`` or ``"video"``.
        tokenizer: Builds the tokenizer.
        encoder: Builds the batch encoder from the tokenizer.
        generate: ``generate(seed, n, split, start)``: items of a seeded stream.
        validation: ``validation(n)``: the validation split.
        heldout: ``heldout(n)``: the held-out split.
        heldout_seed: Seed of the held-out split (for the manifest).
        train_seed_offset: Training streams use ``train_seed_offset + seed``.
        train_defaults: :class:`TrainConfig` fields this task sets differently from the image
            organism's defaults, as ``(name, value)`` pairs.
    """

    name: str
    tokenizer: Callable[[], Any]
    encoder: Callable[[Any], Any]
    generate: Callable[..., list]
    validation: Callable[[int], list]
    heldout: Callable[[int], list]
    heldout_seed: int
    train_seed_offset: int
    train_defaults: tuple[tuple[str, Any], ...] = ()

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The task's :class:`TrainConfig`: its defaults, then ``overrides`` (e.g. ``seed``, ``threads``).

        Raises:
            ConfigError: For a name that is not a field of :class:`TrainConfig`.
        """
        known = {f.name for f in fields(TrainConfig)}
        values = {**dict(self.train_defaults), **overrides}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training settings {unknown}; known: {', '.join(sorted(known))}")
        return TrainConfig(**values)


IMAGE_TASK = OrganismTask("image", build_tokenizer, Encoder, generate, validation, heldout, HELDOUT_SEED,
                          TRAIN_SEED_OFFSET)  # fmt: skip
"""The built-in image organism's task (the default everywhere)."""


def visuals(samples: Sequence[Any]) -> list[Any]:
    """Each sample's visual input for its encoder: the video clip of a video item, else the image."""
    return [s.video if getattr(s, "video", None) is not None else s.image for s in samples]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the three training phases (defaults follow the feasibility study)."""

    seed: int = 0
    threads: int = 1
    # SFT base
    sft_lr: float = 2e-3
    sft_batch: int = 64
    sft_warmup: int = 50
    sft_max_steps: int = 400
    sft_min_steps: int = 30
    sft_check_every: int = 10
    sft_stop_acc: float = 0.45
    # Opt-in caption stage before SFT (0: off, the shipped organism); see lens.organism.caption.
    caption_steps: int = 0
    caption_warmup: int = 20
    # GRPO
    rl_steps: int = 300
    rl_prompts: int = 16
    rl_group: int = 8
    rl_lr: float = 3e-4
    rl_warmup: int = 20
    rl_max_new_tokens: int = 4
    # control (SFT continuation, same number of updates as GRPO)
    control_lr: float = 3e-4
    control_batch: int = 64
    # monitoring
    val_n: int = 256
    val_every: int = 10
    heldout_n: int = 500
    eval_batch: int = 250

    def __post_init__(self):
        if self.rl_group < 2:
            raise ConfigError("rl_group must be >= 2 for group-normalised advantages")
        if self.threads < 1:
            raise ConfigError("threads must be >= 1")
        if self.caption_steps < 0:
            raise ConfigError(f"caption_steps must be >= 0, got {self.caption_steps}")
        if self.caption_warmup < 1:
            raise ConfigError(f"caption_warmup must be >= 1, got {self.caption_warmup}")


class TrainStream:
    """Deterministic stream of training items for one phase (disjoint from validation/held-out)."""

    def __init__(self, seed: int, phase: int, task: OrganismTask = IMAGE_TASK):
        self.seed = task.train_seed_offset + seed
        self.next = phase * 10_000_000
        self.generate = task.generate

    def take(self, n: int) -> list[Sample]:
        out = self.generate(self.seed, n, "train", start=self.next)
        self.next += n
        return out


def response_for(sample: Sample) -> str:
    """The SFT target response for a sample."""
    return f"answer {sample.answer}"


def sft_loss(model, enc: Encoder, samples: Sequence[Sample]) -> torch.Tensor:
    """Mean cross-entropy over response tokens (``answer N<|im_end|>``) only."""
    b = enc.encode([s.question for s in samples], visuals(samples), [response_for(s) for s in samples])
    p = int(b.pop("prompt_len"))
    logits = model(**b).logits[:, p - 1 : -1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["input_ids"][:, p:].reshape(-1))


@torch.no_grad()
def teacher_forced_accuracy(model, enc: Encoder, samples: Sequence[Sample], batch: int = 256) -> float:
    """Fraction of items whose greedy ``answer N`` is right, read off one teacher-forced forward pass.

    Greedy decoding emits ``answer`` iff it is the argmax after the prompt, and then ``N`` iff ``N`` is the
    argmax given ``answer``; so for this response format the check equals greedy decoding of the first
    two tokens, at the cost of one forward pass.
    """
    was_training = model.training
    model.eval()
    hits = 0
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        b = enc.encode([s.question for s in chunk], visuals(chunk), [response_for(s) for s in chunk])
        p = int(b.pop("prompt_len"))
        pred = model(**b).logits[:, p - 1 : p + 1].argmax(-1)
        hits += int((pred == b["input_ids"][:, p : p + 2]).all(-1).sum())
    model.train(was_training)
    return hits / max(len(samples), 1)


def _repeat_batch(b: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Repeat every item of an encoded batch ``k`` times (item-major, like ``num_return_sequences``)."""
    n = b["input_ids"].shape[0]
    out = {}
    for key, value in b.items():
        if key in ("pixel_values", "pixel_values_videos"):  # rows of patches: equal per item here
            out[key] = value.view(n, -1, value.shape[-1]).repeat_interleave(k, 0).reshape(-1, value.shape[-1])
        elif key != "prompt_len":
            out[key] = value.repeat_interleave(k, 0)
    return out


@torch.no_grad()
def rollout(
    model,
    enc: Encoder,
    samples: Sequence[Sample],
    n: int = 1,
    do_sample: bool = False,
    max_new_tokens: int = 4,
    batch_size: int = 256,
    return_ids: bool = False,
):
    """Generate ``n`` responses per sample (greedy, or sampled at T=1 with no top-k/top-p).

    Vision special tokens are suppressed so sampling never emits them.

    Returns:
        A list (per sample) of lists of ``n`` decoded responses; with ``return_ids`` also the
        completion-token tensor of shape ``(len(samples) * n, max_new_tokens)``.
    """
    was_training = model.training
    model.eval()
    tok = enc.tok
    texts: list[list[str]] = []
    all_ids = []
    per = max(1, batch_size // n)
    for i in range(0, len(samples), per):
        chunk = samples[i : i + per]
        b = _repeat_batch(enc.encode([s.question for s in chunk], visuals(chunk)), n)
        p = b["input_ids"].shape[1]
        kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
        g = model.generate(
            **b,
            max_new_tokens=max_new_tokens,
            suppress_tokens=suppress_ids(tok),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **kw,
        )[:, p:]
        if g.shape[1] < max_new_tokens:  # every row stopped early
            g = F.pad(g, (0, max_new_tokens - g.shape[1]), value=tok.pad_token_id)
        all_ids.append(g)
        dec = tok.batch_decode(g, skip_special_tokens=True)
        texts.extend(dec[j * n : (j + 1) * n] for j in range(len(chunk)))
    model.train(was_training)
    if return_ids:
        return texts, torch.cat(all_ids)
    return texts


def greedy_correct(model, enc: Encoder, samples: Sequence[Sample], batch_size: int = 250) -> list[bool]:
    """Per-item correctness of greedy decoding."""
    outs = rollout(model, enc, samples, n=1, do_sample=False, batch_size=batch_size)
    return [verify(o[0], s.answer) for o, s in zip(outs, samples, strict=True)]


def grpo_step(
    model,
    opt: torch.optim.Optimizer,
    enc: Encoder,
    samples: Sequence[Sample],
    group: int,
    max_new_tokens: int = 4,
) -> dict[str, float]:
    """One GRPO update: sample a group per prompt, reward with the verifier, policy-gradient step.

    Returns:
        ``loss``, ``reward`` (mean over all completions) and ``active`` (fraction of groups with reward
        variance; only those carry gradient). ``updated`` is 1.0 when an optimizer step was taken.
    """
    texts, comp = rollout(model, enc, samples, n=group, do_sample=True, max_new_tokens=max_new_tokens,
                          batch_size=len(samples) * group, return_ids=True)  # fmt: skip
    rewards = torch.tensor(
        [[float(verify(t, s.answer)) for t in ts] for ts, s in zip(texts, samples, strict=True)]
    )
    std = rewards.std(dim=1, keepdim=True)
    adv = (rewards - rewards.mean(dim=1, keepdim=True)) / (std + 1e-4)
    active = (std.squeeze(1) > 0).nonzero().squeeze(1)
    stats = {
        "reward": float(rewards.mean()),
        "active": len(active) / len(samples),
        "loss": 0.0,
        "updated": 0.0,
    }
    if len(active) == 0:
        return stats
    tok = enc.tok
    chosen = [samples[int(i)] for i in active]
    b = _repeat_batch(enc.encode([s.question for s in chosen], visuals(chosen)), group)
    p = b["input_ids"].shape[1]
    comp = comp.view(len(samples), group, -1)[active].reshape(len(chosen) * group, -1)
    # Completion mask: tokens up to and including the first eos.
    is_eos = comp == tok.eos_token_id
    mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    ids = torch.cat([b["input_ids"], comp], dim=1)
    model.train()
    visual = {k: v for k, v in b.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    logits = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=F.pad(b["mm_token_type_ids"], (0, comp.shape[1])),  # completions are text
        **visual,
    ).logits[:, p - 1 : -1]
    # The sampler never emits vision tokens, so the policy is the renormalised distribution without them.
    logits = logits.index_fill(-1, torch.tensor(suppress_ids(tok)), float("-inf"))
    logp = torch.log_softmax(logits, -1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)
    a = adv[active].reshape(-1, 1)
    loss = -(a * logp * mask).sum() / mask.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    model.eval()
    stats.update(loss=loss.item(), updated=1.0)
    return stats


def sft_step(model, opt, sched, enc: Encoder, samples: Sequence[Sample]) -> float:
    """One supervised update; returns the loss."""
    model.train()
    loss = sft_loss(model, enc, samples)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if sched is not None:
        sched.step()
    model.eval()
    return loss.item()


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="organism", disable=not enabled, unit="step", dynamic_ncols=True)


def train_models(
    cfg: TrainConfig = TrainConfig(),
    progress: bool = True,
    arch: TinyConfig = TinyConfig(),
    task: OrganismTask = IMAGE_TASK,
):
    """Train base, rlvr and control in memory.

    Args:
        cfg: Hyper-parameters.
        progress: Show a tqdm bar.
        arch: Model architecture.
        task: The task (the image organism's by default).

    Returns:
        ``(models, tokenizer, log, info)``: ``models`` maps name to model, ``log`` is a list of per-step
        dicts (phase, step, loss, reward, val_acc, seconds) and ``info`` holds step counts and timings.
    """
    if cfg.caption_steps and task.name != "image":
        raise ConfigError("the caption stage needs the image organism's task (--task image)")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train_models(cfg, progress, arch, task)
    finally:
        torch.set_num_threads(prev_threads)


def _train_models(cfg: TrainConfig, progress: bool, arch: TinyConfig, task: OrganismTask):
    tok = task.tokenizer()
    enc = task.encoder(tok)
    val = task.validation(cfg.val_n)
    log: list[dict] = []
    info: dict = {}
    t0 = time.time()
    bar = _bar(cfg.sft_max_steps + 2 * cfg.rl_steps, progress)

    def record(phase: str, step: int, loss: float, reward: float | None = None, val_acc: float | None = None):
        log.append(dict(phase=phase, step=step, loss=round(loss, 6), reward=reward, val_acc=val_acc,
                        seconds=round(time.time() - t0, 2)))  # fmt: skip

    # --- base: SFT with early stopping (after the opt-in caption stage) -----------------------------
    base = build_model(tok, arch, seed=cfg.seed)
    if cfg.caption_steps:
        info["caption_steps"] = _caption_stage(base, enc, cfg, record)
        info["caption_seconds"] = round(time.time() - t0, 1)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(base.parameters(), lr=cfg.sft_lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.sft_warmup))
    stream = TrainStream(cfg.seed, phase=0, task=task)
    sft_steps = 0
    for step in range(1, cfg.sft_max_steps + 1):
        loss = sft_step(base, opt, sched, enc, stream.take(cfg.sft_batch))
        acc = None
        if step % cfg.sft_check_every == 0:
            acc = teacher_forced_accuracy(base, enc, val)
        record("sft", step, loss, val_acc=acc)
        bar.update(1)
        bar.set_postfix(phase="sft", loss=f"{loss:.3f}", val=acc if acc is None else f"{acc:.2f}")
        sft_steps = step
        if acc is not None and step >= cfg.sft_min_steps and acc >= cfg.sft_stop_acc:
            break
    bar.total = sft_steps + 2 * cfg.rl_steps
    bar.refresh()
    info["sft_steps"] = sft_steps
    info["sft_seconds"] = round(time.time() - t0, 1)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}

    # --- rlvr: GRPO from the base ---------------------------------------------------------------------
    t1 = time.time()
    rlvr = build_model(tok, arch, seed=cfg.seed)
    rlvr.load_state_dict(base_state)
    torch.manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(rlvr.parameters(), lr=cfg.rl_lr, betas=(0.9, 0.99), weight_decay=0.0)
    # Warmup: Adam's first steps move every weight by ~lr whatever the gradient's size, which on a
    # noisy policy gradient knocks a fresh base off its mode.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.rl_warmup, 1)))
    stream = TrainStream(cfg.seed, phase=1, task=task)
    updates = 0
    for step in range(1, cfg.rl_steps + 1):
        st = grpo_step(rlvr, opt, enc, stream.take(cfg.rl_prompts), cfg.rl_group, cfg.rl_max_new_tokens)
        if st["updated"]:
            sched.step()
        updates += int(st["updated"])
        acc = teacher_forced_accuracy(rlvr, enc, val) if step % cfg.val_every == 0 else None
        record("grpo", step, st["loss"], reward=round(st["reward"], 4), val_acc=acc)
        bar.update(1)
        bar.set_postfix(phase="grpo", reward=f"{st['reward']:.2f}", val=acc if acc is None else f"{acc:.2f}")
    info["rl_steps"] = cfg.rl_steps
    info["rl_updates"] = updates
    info["rl_seconds"] = round(time.time() - t1, 1)

    # --- control: SFT continuation for the same number of updates -----------------------------------
    t2 = time.time()
    control = build_model(tok, arch, seed=cfg.seed)
    control.load_state_dict(base_state)
    torch.manual_seed(cfg.seed + 2)
    opt = torch.optim.AdamW(control.parameters(), lr=cfg.control_lr, betas=(0.9, 0.98), weight_decay=0.01)
    stream = TrainStream(cfg.seed, phase=2, task=task)
    for step in range(1, updates + 1):
        loss = sft_step(control, opt, None, enc, stream.take(cfg.control_batch))
        acc = teacher_forced_accuracy(control, enc, val) if step % cfg.val_every == 0 else None
        record("control", step, loss, val_acc=acc)
        bar.update(1)
        bar.set_postfix(phase="control", loss=f"{loss:.3f}", val=acc if acc is None else f"{acc:.2f}")
    bar.update(bar.total - bar.n)
    bar.close()
    info["control_updates"] = updates
    info["control_seconds"] = round(time.time() - t2, 1)
    info["train_seconds"] = round(time.time() - t0, 1)
    return {"base": base, "rlvr": rlvr, "control": control}, tok, log, info


def _caption_stage(model, enc: Encoder, cfg: TrainConfig, record: Callable[..., None]) -> int:
    """``cfg.caption_steps`` updates of :func:`lens.organism.caption.caption_loss` on a fresh stream."""
    from lens.organism.caption import caption_loss

    torch.manual_seed(cfg.seed + 3)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.caption_warmup))
    stream = TrainStream(cfg.seed, phase=3)  # phases 0-2 are SFT, GRPO and control
    for step in range(1, cfg.caption_steps + 1):
        model.train()
        loss = caption_loss(model, enc, stream.take(cfg.sft_batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        record("caption", step, loss.item())
    model.eval()
    return cfg.caption_steps


def write_log(log: list[dict], out_dir: Path) -> None:
    """Write the per-step log as ``training_log.csv`` and ``training_log.json``."""
    fields = ["phase", "step", "loss", "reward", "val_acc", "seconds"]
    with open(out_dir / "training_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in log:
            w.writerow({k: ("" if row[k] is None else row[k]) for k in fields})
    (out_dir / "training_log.json").write_text(json.dumps(log) + "\n")


def train(
    out_dir: str | os.PathLike,
    cfg: TrainConfig = TrainConfig(),
    progress: bool = True,
    on_done: Callable[[dict], None] | None = None,
    task: OrganismTask = IMAGE_TASK,
    arch: TinyConfig = TinyConfig(),
) -> dict:
    """Train the trio and write ``{base,rlvr,control}/``, the log and ``manifest.json`` to ``out_dir``.

    Everything is written to a temporary sibling folder first and swapped in at the end, so an
    interrupted run never replaces good weights with half-written ones.

    Args:
        out_dir: Output folder.
        cfg: Hyper-parameters (``caption_steps > 0`` adds the caption stage before SFT).
        progress: Show a tqdm bar.
        on_done: Called with the manifest once the folder is in place.
        task: The task (the image organism's by default).
        arch: Model architecture (``tie_word_embeddings=True`` for the readable variant).

    Returns:
        The manifest (seed, steps, timings and each model's held-out greedy accuracy).
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    models, tok, log, info = train_models(cfg, progress=progress, arch=arch, task=task)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        prev = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        enc = task.encoder(tok)
        test = task.heldout(cfg.heldout_n)
        accuracy = {}
        for name, m in models.items():
            save_folder(m, tok, tmp / name)
            ok = greedy_correct(m, enc, test, batch_size=cfg.eval_batch)
            accuracy[name] = {"correct": sum(ok), "n": len(ok), "accuracy": sum(ok) / len(ok)}
        torch.set_num_threads(prev)
        write_log(log, tmp)
        manifest = {
            "seed": cfg.seed,
            **({} if task is IMAGE_TASK else {"task": task.name}),
            "train_config": asdict(cfg),
            "architecture": config_dict(arch),
            **info,
            "heldout_greedy": accuracy,
            "heldout_seed": task.heldout_seed,
            "eval_batch": cfg.eval_batch,
            "total_seconds": round(time.time() - t0, 1),
            "torch": torch.__version__,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if on_done:
        on_done(manifest)
    return manifest


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with two renames (the old folder is deleted only after the swap)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
