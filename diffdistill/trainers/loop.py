"""The generic training loop behind ``diffdistill distill``; it never knows which method it runs.

Per training step: draw a batch (indices from the run's one seeded generator), then for every
:class:`~diffdistill.trainers.method.Phase` the method declares, ``repeat`` optimizer steps of that
phase's role — each over ``grad_accum`` micro-batches, with gradient clipping, under accelerate's
autocast — then EMA updates of the student, ``Method.after_step``, logging (tensorboard, ``log.jsonl``,
tqdm), sample grids and atomic checkpoints (:mod:`.checkpoint`). ``resume=True`` continues from the
newest verified checkpoint and reproduces an uninterrupted run bit for bit on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import save_config, to_dict
from ..data import build_dataset, random_batch
from ..denoiser import Conditioning, standard_guidance_scale
from ..errors import ConfigError, DataError, DiffDistillError
from ..grid import save_grid
from ..pretrained import load_pretrained
from ..processes import cpu_process_group
from ..samplers import generate
from .ema import ema_decay, ema_update
from .checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint, load_network_state, save_checkpoint, shared_keys
from .method import DistillConfig, Method, OptimConfig, get_method
from .lora import frozen_sharing_copy
from .sharding import shard_frozen_teacher

CONFIG_FILE = "config.yaml"


def lr_factor(cfg: OptimConfig, total_steps: int):
    """Linear warm-up over ``warmup_steps``, then constant, or a cosine or linear decay to 0 at the end
    over all steps or over the last ``decay_steps``; with ``cycle_steps`` the end is each cycle's."""
    horizon = cfg.cycle_steps or total_steps
    start = max(0, horizon - cfg.decay_steps) if cfg.decay_steps else 0

    def factor(step: int) -> float:
        local = step % horizon if cfg.cycle_steps else step
        warm = min(1.0, (local + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.schedule == "constant":
            return warm
        progress = min(max(local - start, 0), horizon - start) / max(horizon - start, 1)
        return warm * (0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress)
    return factor


RESUMABLE_OPTIM_KEYS = ("schedule", "decay_steps", "cycle_steps")  # may change on resume where the steps already taken keep their rates


def _check_resume_config(run_dir: Path, cfg: DistillConfig, step: int) -> None:
    """Refuse to resume ``run_dir`` (at ``step``) with a config that computes a step differently. Only
    ``train.max_steps``, ``train.shard_teacher`` and a role's learning-rate ``schedule`` / ``decay_steps`` /
    ``cycle_steps`` may change, and those only where every role's learning rate at steps ``0 .. step-1`` is the
    one the run was trained with: a constant run resumes into a warmup-stable-decay tail; a cosine run
    cannot be stretched to more steps (its past rates would differ)."""
    from ..config import load_config

    saved_cfg = load_config(type(cfg), run_dir / CONFIG_FILE)
    saved, new = to_dict(saved_cfg), to_dict(cfg)
    if saved["method"] != new["method"]:
        raise DiffDistillError(f"cannot resume {run_dir}: it was made by method {saved['method']}, not {new['method']}; "
                               "resume it with its own config.yaml, or start a new run directory")
    optim_roles = [k for k, v in vars(cfg).items() if isinstance(v, OptimConfig)]
    for role in optim_roles:
        for key in RESUMABLE_OPTIM_KEYS:
            saved[role].pop(key, None), new[role].pop(key, None)
    for key in ("max_steps", "shard_teacher"):
        saved["train"].pop(key, None), new["train"].pop(key, None)
    if saved != new:
        def flat(d, prefix=""):
            return {k2: v2 for k, v in d.items() for k2, v2 in
                    (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(f"{prefix}{k}", v)])}

        old_flat, new_flat = flat(saved), flat(new)
        key = next(k for k in sorted(set(old_flat) | set(new_flat)) if old_flat.get(k) != new_flat.get(k))
        raise DiffDistillError(f"cannot resume {run_dir}: its config has {key}={old_flat.get(key)!r}, this one "
                               f"{new_flat.get(key)!r} (only train.max_steps, train.shard_teacher and a "
                               "learning-rate schedule that keeps the steps already taken may change on resume); "
                               "start a new run directory instead")
    for role in optim_roles:
        old_f = lr_factor(getattr(saved_cfg, role), saved_cfg.train.max_steps)
        new_f = lr_factor(getattr(cfg, role), cfg.train.max_steps)
        changed = next((k for k in range(step) if not math.isclose(old_f(k), new_f(k), rel_tol=1e-12, abs_tol=1e-15)),
                       None)
        if changed is not None:
            raise DiffDistillError(
                f"cannot resume {run_dir} at step {step}: {role}'s learning rate at step {changed} would be "
                f"{new_f(changed):.6g}× lr, it was trained with {old_f(changed):.6g}× (a cosine decay over all steps "
                f"cannot be stretched; use {role}.decay_steps for a decay that starts later)")


def configure_networks(all_networks: list[nn.Module], trained: list[nn.Module], train) -> dict[str, str]:
    """Apply ``train.attention`` to every diffusers network with attention processors and
    ``train.gradient_checkpointing`` to the trained ones; returns what was chosen."""
    available = torch.cuda.is_available() and importlib.util.find_spec("xformers") is not None
    use_xformers = train.attention == "xformers" or (train.attention == "auto" and available)
    if use_xformers and not available:
        raise ConfigError("train.attention=xformers needs a CUDA GPU and the xformers extra "
                          "(pip install 'diffdistill[xformers]'); use train.attention=auto")
    for net in all_networks:
        if not hasattr(net, "set_attn_processor"):
            continue  # no attention processors (e.g. UNet2DModel's attention is plain SDPA already)
        if use_xformers:
            net.enable_xformers_memory_efficient_attention()
        else:
            from diffusers.models.attention_processor import AttnProcessor2_0

            net.set_attn_processor(AttnProcessor2_0())
    if train.gradient_checkpointing:
        supported = [n for n in trained if getattr(n, "_supports_gradient_checkpointing", False)]
        if not supported:
            raise ConfigError("train.gradient_checkpointing: none of this method's trained networks supports it; "
                              "set it to false")
        for net in supported:
            net.enable_gradient_checkpointing()
    return {"attention": "xformers" if use_xformers else "sdpa"}


def build_method(cfg: DistillConfig, device: torch.device | str = "cpu") -> Method:
    teacher = load_pretrained(cfg.teacher, device=device,
                              guidance_scale=standard_guidance_scale(cfg.guidance_scale, cfg.guidance_convention))
    return get_method(cfg.method)(cfg, teacher)


def last_logged_step(run_dir: Path) -> int:
    """The step of the last complete line of ``run_dir/log.jsonl`` (0 when there is none yet)."""
    try:
        lines = (Path(run_dir) / "log.jsonl").read_text().strip().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def _truncate_log(path: Path, step: int) -> None:
    """Keep the lines of ``log.jsonl`` up to ``step`` (atomically)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:  # a line cut short by the crash
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class Trainer:
    """Owns the optimizers, EMA copies, RNG and I/O of one run; see the module docstring."""

    def __init__(self, cfg: DistillConfig, run_dir: str | Path, *, max_steps: int | None = None, progress: bool = True):
        from accelerate import Accelerator

        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.total_steps = cfg.train.max_steps if max_steps is None else min(max_steps, cfg.train.max_steps)
        self.accelerator = Accelerator(cpu=cfg.train.cpu or cpu_process_group(),
                                       mixed_precision=cfg.train.mixed_precision)
        shards = self.accelerator.num_processes * cfg.train.grad_accum
        if cfg.train.batch_size % shards:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not split into {self.accelerator.num_processes} "
                              f"process(es) × train.grad_accum={cfg.train.grad_accum} equal micro-batches; make it a "
                              f"multiple of {shards}")
        self.method = build_method(cfg, self.accelerator.device)
        self.roles = self.method.trainable_roles()
        configure_networks([self.method.teacher.network, *self.roles.values()], list(self.roles.values()), cfg.train)
        if cfg.train.shard_teacher or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            self._shard_teacher()
        if "student" not in self.roles:
            raise DiffDistillError(f"method {cfg.method} declares no 'student' role")
        self.optimizers, self.schedulers = {}, {}
        for role, module in self.roles.items():
            oc = self.method.optim_config(role)
            params = [p for p in module.parameters() if p.requires_grad]  # a LoRA critic trains adapters only
            opt = torch.optim.AdamW(params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)
            self.optimizers[role] = opt
            self.schedulers[role] = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(oc, cfg.train.max_steps))
        self.ema = {d: frozen_sharing_copy(self.roles["student"]).eval().requires_grad_(False) for d in cfg.train.ema_decays}
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        if cfg.data.dataset != "analytic":
            self.method.teacher.check_images_fit(cfg.data.channels, cfg.data.resolution)
        self.dataset = build_dataset(cfg.data)
        if self.method.teacher.text_conditioned and not getattr(self.dataset, "captions", None):
            raise DataError("the teacher is text-conditioned: train on captioned images (data.dataset=folder, "
                            "data.captions=true, a .txt caption beside each image)")
        self.step = 0
        self.ema_start = 0  # the step the EMA copies were last (re)started from the student
        self.nonfinite_streak = self.nonfinite_total = 0

    def _shard_teacher(self) -> None:
        world = self.accelerator.num_processes
        if world == 1:
            if self.accelerator.is_main_process:
                print("train.shard_teacher: a single process, so the teacher stays whole", flush=True)
            return
        here, whole = shard_frozen_teacher(self.method.teacher.network, self.roles, world, self.accelerator.device)
        if self.accelerator.is_main_process:
            print(f"teacher sharded over {world} processes: {here:,} of its {whole:,} weights on this one", flush=True)

    # --- checkpoints ---------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        """Every network a checkpoint holds (file stem → module); the frozen teacher is not among them."""
        nets = {**self.roles, **self.method.buffer_roles()}
        nets.update({f"ema_{d:g}": m for d, m in self.ema.items()})
        return nets

    def _own_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s state without the teacher's tensors: the frozen teacher is never checkpointed."""
        shared = shared_keys(module, self.method.teacher.denoiser)
        return {k: t for k, t in module.state_dict().items() if k not in shared}

    def save(self) -> Path:
        state = {"step": self.step, "ema_start": self.ema_start, "generator": self.generator.get_state(),
                 "nonfinite": [self.nonfinite_streak, self.nonfinite_total],
                 "method": self.method.state_dict(),
                 "optimizers": {r: o.state_dict() for r, o in self.optimizers.items()},
                 "schedulers": {r: s.state_dict() for r, s in self.schedulers.items()}}
        nets = {stem: self._own_state(m) for stem, m in self.networks().items()}
        return save_checkpoint(self.run_dir, self.step, nets, state, self.cfg.train.keep_checkpoints)

    def load(self, path: Path) -> None:
        nets, state = load_checkpoint(path)
        self.method.load_state_dict(state["method"])  # may rebuild buffer roles (e.g. a new round)
        for stem, module in self.networks().items():
            if stem not in nets:
                raise DiffDistillError(f"checkpoint {path} has no '{stem}' weights; was it made by another method?")
            load_network_state(module, nets[stem], self.method.teacher.denoiser, f"checkpoint {path}: '{stem}' weights")
        for role, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][role])
            self.schedulers[role].load_state_dict(state["schedulers"][role])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.ema_start = int(state["ema_start"])
        self.nonfinite_streak, self.nonfinite_total = (int(v) for v in state.get("nonfinite", (0, 0)))

    # --- one step ------------------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, Conditioning]:
        """This process's share of a random batch: images (as latents for a latent teacher) and their
        conditioning (class labels, or the text embeddings of their captions for a text-conditioned
        teacher). Every process draws the same ``train.batch_size`` indices and keeps its own slice."""
        x0, labels = random_batch(self.dataset, self.cfg.train.batch_size, self.generator)
        share = len(x0) // self.accelerator.num_processes
        mine = slice(self.accelerator.process_index * share, (self.accelerator.process_index + 1) * share)
        x0, labels = x0[mine], labels[mine]
        device, teacher = self.accelerator.device, self.method.teacher
        if teacher.text_conditioned:
            cond = teacher.encode_prompts([self.dataset.captions[int(i)] for i in labels])
        elif teacher.num_classes:
            cond = Conditioning(class_labels=labels.to(device))
        else:
            cond = Conditioning()
        return teacher.encode(x0.to(device)), cond

    def train_step(self) -> dict[str, float]:
        """One step: every phase's updates, then the EMA. A phase update whose loss or gradient norm is
        not finite is skipped (no optimizer or EMA update; the data and RNG still advance), counted in
        ``train/nonfinite_steps`` (logged once non-zero); ``train.max_nonfinite_steps`` such steps in a row stop the run."""
        x0, cond = self._batch()
        accum, logged, finite = self.cfg.train.grad_accum, {}, True
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        for phase in self.method.phases(self.step):
            roles = (phase.role,) if isinstance(phase.role, str) else tuple(phase.role)
            self._trainable(roles)  # other roles' weights get no gradients (DMD2 freezes its critic likewise)
            for _ in range(phase.repeat):
                update_finite = True
                # one seed per micro-batch of the whole batch (all processes): micro-batch j of process r
                # draws its noise from seeds[r·accum + j], so N processes × B/N equal 1 × B in N micro-batches
                seeds = torch.randint(0, 2**62, (world * accum,), generator=self.generator).tolist()
                for j, (xs, idx) in enumerate(zip(x0.chunk(accum), torch.arange(len(x0)).chunk(accum))):
                    generator = torch.Generator().manual_seed(seeds[rank * accum + j])
                    with self.accelerator.autocast():
                        terms = self.method.loss(phase.name, (xs, cond[idx.to(xs.device)]), self.step, generator)
                    if not torch.isfinite(terms["loss"].detach()).all():
                        update_finite = False
                        break
                    self.accelerator.backward(terms["loss"] / accum)
                    for k, v in terms.items():
                        logged[f"{phase.name}/{k}"] = logged.get(f"{phase.name}/{k}", 0.0) + v.item() / accum / phase.repeat
                if world > 1:
                    update_finite = self._average_gradients(roles, update_finite)
                for role in roles:  # only these roles' weights received gradients
                    if update_finite and self.cfg.train.grad_clip > 0:
                        norm = self.accelerator.clip_grad_norm_(self._params(role), self.cfg.train.grad_clip)
                        update_finite = bool(torch.isfinite(torch.as_tensor(norm)))
                if update_finite:
                    for role in roles:
                        self.optimizers[role].step()
                        self.schedulers[role].step()
                for role in roles:
                    self.optimizers[role].zero_grad(set_to_none=True)
                finite &= update_finite
        self._trainable(tuple(self.roles))
        if world > 1 and logged and finite:  # every process's terms, averaged: the loss curve of the whole batch
            # (``finite`` is agreed across processes; only finite steps are sure to have the same terms everywhere)
            names = sorted(logged)
            means = self.accelerator.reduce(torch.tensor([logged[k] for k in names], device=self.accelerator.device), "mean")
            logged = dict(zip(names, means.tolist()))
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        self.nonfinite_total += 0 if finite else 1
        if finite:
            for decay, ema in self.ema.items():
                ema_update(ema, self.roles["student"], ema_decay(decay, self.step + 1 - self.ema_start,
                                                                  self.cfg.train.ema_rampup))
        if self.method.after_step(self.step):
            for ema in self.ema.values():
                ema.load_state_dict(self.roles["student"].state_dict())
            self.ema_start = self.step + 1
        self.step += 1
        if self.nonfinite_streak >= self.cfg.train.max_nonfinite_steps:
            last = latest_checkpoint(self.run_dir)
            raise DiffDistillError(f"{self.nonfinite_streak} training steps in a row had a non-finite loss or gradient "
                                   f"(up to step {self.step}); stopped. The last good checkpoint is "
                                   f"{last.name if last else 'none'}; lower the learning rates or check the data")
        if self.nonfinite_total:  # logged from the first skipped step on
            logged["train/nonfinite_steps"] = float(self.nonfinite_total)
        return logged

    def _average_gradients(self, roles: tuple[str, ...], finite: bool) -> bool:
        """Average ``roles``' gradients over the processes (one flat all-reduce per role) and whether every
        process's update was finite. Explicit rather than DDP wrappers: a phase trains some roles while the
        others' weights are frozen, which DDP's fixed parameter registration cannot follow."""
        import torch.distributed as dist

        world = self.accelerator.num_processes
        flag = torch.tensor([float(finite)], device=self.accelerator.device)
        dist.all_reduce(flag)
        for role in roles:
            params = self._params(role)
            has = torch.tensor([float(p.grad is not None) for p in params], device=self.accelerator.device)
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params] + [has])
            dist.all_reduce(flat)  # in place: one flat buffer per role
            flat /= world
            offset = 0
            for p, got in zip(params, flat[-len(params):].tolist()):
                if got > 0:
                    grad = flat[offset:offset + p.numel()].view_as(p)
                    p.grad = grad.clone() if p.grad is None else p.grad.copy_(grad)
                else:
                    p.grad = None
                offset += p.numel()
        return bool(flag.item() == world)

    def _params(self, role: str) -> list[torch.Tensor]:
        """The weights ``role``'s optimizer trains."""
        return [p for group in self.optimizers[role].param_groups for p in group["params"]]

    def _trainable(self, roles: tuple[str, ...]) -> None:
        for role in self.optimizers:
            for p in self._params(role):
                p.requires_grad_(role in roles)

    # --- the run -------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> Path:
        main = self.accelerator.is_main_process
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is None:
                raise DiffDistillError(f"--resume: {self.run_dir} has no complete checkpoint; start without --resume")
            _check_resume_config(self.run_dir, self.cfg, checkpoint_step(ckpt))
            self.load(ckpt)
            if main:  # forget what was logged after the checkpoint: those steps run again
                _truncate_log(self.run_dir / "log.jsonl", self.step)
        elif main:  # a fresh run in a directory allowed to be non-empty: no stale checkpoint, log or grid survives
            for stale in ("checkpoints", "tb", "samples"):
                shutil.rmtree(self.run_dir / stale, ignore_errors=True)
            (self.run_dir / "log.jsonl").unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()  # every process has read config.yaml and the checkpoint
        if main:
            save_config(self.cfg, self.run_dir / CONFIG_FILE)
        self.accelerator.wait_for_everyone()
        writer = None
        if main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tb"))
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.cfg.method, disable=not (self.progress and main))
        with open(self.run_dir / "log.jsonl", "a") as log:
            while self.step < self.total_steps:
                terms = self.train_step()
                bar.update(1)
                if main and (self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps):
                    lrs = {f"lr/{r}": s.get_last_lr()[0] for r, s in self.schedulers.items()}
                    for k, v in {**terms, **lrs}.items():
                        writer.add_scalar(k, v, self.step)
                    log.write(json.dumps({"step": self.step, **terms, **lrs}) + "\n")
                    log.flush()
                    bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in terms.items()})
                if main and self.cfg.train.sample_every and self.step % self.cfg.train.sample_every == 0:
                    self.sample_grids()
                if main and (self.step % self.cfg.train.checkpoint_every == 0 or self.step == self.total_steps):
                    self.save()
        bar.close()
        if writer is not None:
            writer.close()
        self.accelerator.wait_for_everyone()  # the main process's last checkpoint is written
        return self.run_dir

    @torch.no_grad()
    def sample_grids(self, num_per_class: int = 2) -> list[Path]:
        """One PNG per step count in ``sample_steps`` from the first EMA copy; columns are classes."""
        decay = self.cfg.train.ema_decays[0] if self.ema else None
        student = self.method.student_denoiser(self.ema[decay] if decay is not None else self.roles["student"])
        if len(self.method.teacher.sample_shape) != 3:  # not images (e.g. 2-D toy data)
            return []
        classes = self.method.teacher.num_classes
        num = num_per_class * max(classes, 1) if classes else 16
        cond = self.method.teacher.cycled_conditioning(num, getattr(self.dataset, "captions", None))
        paths = []
        for n in self.cfg.sample_steps:
            images = generate(student, self.method.teacher.sample_shape, num, sampler=self.method.student_sampler,
                              timesteps=self.method.student_timesteps(n), cond=cond, seed=0,
                              device=self.accelerator.device)
            paths.append(save_grid(self.method.teacher.decode(images), self.run_dir / "samples" /
                                   f"step_{self.step:07d}_{n}step.png", ncols=classes or None))
        return paths


def distill(cfg: DistillConfig, run_dir: str | Path, *, max_steps: int | None = None, resume: bool = False,
            progress: bool = True) -> Path:
    """Run (or resume) one distillation; returns the run directory."""
    return Trainer(cfg, run_dir, max_steps=max_steps, progress=progress).run(resume=resume)
