"""Gradient training of chosen initializers through the torch executor, for the fine-tuning passes.

One loop serves every pass that retrains part of a network (`finetune-weights` after pruning,
`finetune-codebook` after clustering): shuffled batches, Adam (or SGD with momentum) under a
cosine-decayed (or stepped, or constant) learning rate with an optional linear warm-up,
cross-entropy with labels or else a label-free loss against the float network's outputs, and
entries held at exactly zero (pruned weights, a codebook's zero slot) however the optimizer rounds.

The same loop keeps to a time budget (``max-minutes``: it stops between steps and hands back the
best epoch's parameters), checkpoints after every epoch and resumes from such a checkpoint, and
seeds every random choice from ``ctx.seed`` so a run can be repeated exactly.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from qcompiler.augment import AugmentName, augment_batch, image_inputs
from qcompiler.data import DataSource
from qcompiler.errors import QCError
from qcompiler.hessian import choose_loss
from qcompiler.ir import is_float_tensor
from qcompiler.pass_manager import PassContext

OptimizerName = Literal["adam", "sgd"]
#: The training losses: hessian's (``auto``, ``cross-entropy``, ``kl``, ``mse``) and both signals at
#: once, ``cross-entropy+kl`` (labels and the float model's outputs, summed with equal weight).
TrainLossName = Literal["auto", "cross-entropy", "kl", "mse", "cross-entropy+kl"]
ScheduleName = Literal["cosine", "step", "constant"]

#: Marks a file as one of `fit`'s checkpoints (and its layout version) before anything else in it is trusted.
CHECKPOINT_FORMAT = "qcompiler-train-checkpoint/1"

# The clock of the time budget and the epoch timings; a module attribute so tests can replace it.
_clock = time.perf_counter


@dataclass(frozen=True)
class TrainSettings:
    """How long and how fast to train: the options of both fine-tuning passes.

    Pipelines write them kebab-case: ``finetune-weights{optimizer=sgd,momentum=0.9,schedule=step,max-minutes=5}``.
    """

    epochs: int = 3
    batch_size: int = 64
    #: The initial learning rate. Under ``schedule=cosine`` it decays to zero along a cosine over
    #: all the steps, so the last steps settle instead of jumping around the minimum (what a fixed
    #: rate leaves behind).
    lr: float = 1e-4
    #: ``auto``: cross-entropy with labels, else KL to the float model's outputs for a classifier,
    #: else their mean squared error; ``cross-entropy+kl`` uses labels and the float model both.
    loss: TrainLossName = "auto"
    #: Random shifted crops (and mirror flips) of 4-D image inputs, fresh every epoch: retraining
    #: on the model's own training images otherwise fits what it already knows (see augment.py).
    augment: AugmentName = "none"
    #: ``adam`` needs no per-model tuning of the rate; ``sgd`` (plain momentum, not Nesterov) is
    #: what most published retraining recipes use, with a larger ``lr`` (0.01 - 0.1).
    optimizer: OptimizerName = "adam"
    #: SGD's momentum (ignored by Adam, which keeps its own moment estimates).
    momentum: float = 0.9
    #: L2 penalty added to every gradient (torch's ``weight_decay``, for either optimizer).
    weight_decay: float = 0.0
    #: ``cosine``: decays to zero over the steps; ``step``: x0.1 at 50 % and again at 75 % of the
    #: steps; ``constant``: the same rate throughout. Counted over the steps after the warm-up.
    schedule: ScheduleName = "cosine"
    #: Steps of linear warm-up (step i < N runs at lr x (i+1)/(N+1)): a large rate on a network
    #: that pruning or clustering just disturbed can otherwise throw it far in the first steps.
    warmup_steps: int = 0
    #: Wall-clock budget in minutes (0: none). Checked between steps; when spent, training stops
    #: and keeps the parameters of the completed epoch with the lowest mean training loss.
    max_minutes: float = 0
    #: Folder to write ``<pass>.pt`` into after every epoch (atomically), for ``resume``. Give each
    #: run of the same pass in one pipeline its own folder.
    checkpoint_dir: str = ""
    #: A ``checkpoint-dir`` folder (or its ``.pt`` file) to continue from, at the epoch after the
    #: last one it holds. Refused if it was written for other parameters or other optimisation options.
    resume: str = ""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("options 'epochs' and 'batch-size' must be >= 1 and 'lr' > 0")
        if not 0 <= self.momentum < 1:
            raise ValueError("option 'momentum' must be in [0, 1)")
        if not self.weight_decay >= 0:
            raise ValueError("option 'weight-decay' must be >= 0")
        if self.warmup_steps < 0:
            raise ValueError("option 'warmup-steps' must be >= 0")
        if not 0 <= self.max_minutes < math.inf:
            raise ValueError("option 'max-minutes' must be a number >= 0 (0: no limit)")


@dataclass
class TrainResult:
    """What `fit` did: the loss history, the timings and how (and whether) it stopped early."""

    #: Mean training loss of every completed epoch, those of a resumed checkpoint included.
    losses: list[float]
    #: Wall-clock seconds of every completed epoch (a resumed checkpoint's included).
    epoch_seconds: list[float]
    #: The learning rate each optimizer step of this run used, in order.
    step_lrs: list[float]
    #: Epochs and optimizer steps completed, a resumed checkpoint's included.
    epochs_completed: int
    steps: int
    #: Training samples per second in this run (forward, backward and update; reference outputs included).
    images_per_second: float
    #: The process's peak resident memory so far (not this run's alone), in MiB.
    peak_memory_mib: float
    #: The learning rate of the last step taken.
    final_lr: float
    #: The highest resident memory sampled while training (every 20 ms), in MiB: this run's own
    #: peak, comparable between passes whatever ran before them (0 where it cannot be read).
    training_peak_memory_mib: float = 0.0
    stopped_early: bool = False
    #: Why training stopped before its last epoch ("" when it did not).
    stop_reason: str = ""
    #: The epoch (1-based) whose parameters were restored after an early stop; None if none was.
    restored_epoch: int | None = None
    #: The epoch a resumed run started after (0 when it did not resume).
    resumed_from_epoch: int = 0
    #: The checkpoint file written after the last epoch, or "".
    checkpoint: str = ""

    # `fit` used to return the per-epoch losses as a list; iterating, indexing and len() still
    # give them, so callers written against that keep working.
    def __iter__(self):
        return iter(self.losses)

    def __len__(self) -> int:
        return len(self.losses)

    def __getitem__(self, index):
        return self.losses[index]

    def stats(self) -> dict[str, Any]:
        """The result as the small, rounded facts a pass puts in its `PassResult` stats."""
        stats: dict[str, Any] = {
            "epochs_completed": self.epochs_completed,
            "steps": self.steps,
            "seconds_per_epoch": [round(s, 3) for s in self.epoch_seconds],
            "images_per_second": round(self.images_per_second, 1),
            "peak_memory_mib": round(self.peak_memory_mib, 1),
            "training_peak_memory_mib": round(self.training_peak_memory_mib, 1),
            "final_lr": float(f"{self.final_lr:.6g}"),
            "stopped_early": self.stopped_early,
        }
        if self.stopped_early:
            stats["stop_reason"] = self.stop_reason
            stats["restored_epoch"] = self.restored_epoch
        if self.resumed_from_epoch:
            stats["resumed_from_epoch"] = self.resumed_from_epoch
        if self.checkpoint:
            stats["checkpoint"] = self.checkpoint
        return stats


def output_value(model: ir.Model, pass_name: str) -> ir.Value:
    """The graph output the loss is defined on (the first; it must be float)."""
    out = model.graph.outputs[0]
    if not is_float_tensor(out):
        raise QCError(f"the loss cannot be defined: output '{out.name}' is not float", pass_name=pass_name)
    return out


def resolve_loss(graph, data: DataSource, out_name: str, requested: str, batch_size: int, pass_name: str) -> str:
    """The loss `fit` will use: cross-entropy with labels, else KL (classifiers) or MSE."""
    first = graph.run(data.first_batch(batch_size), [out_name])[out_name]
    loss_name = choose_loss(requested, tuple(first.shape), data.labels is not None)
    if loss_name.startswith("cross-entropy") and data.labels is None:
        raise QCError(f"loss={loss_name} needs 'labels' in the data file", pass_name=pass_name, option="loss")
    if loss_name.startswith("cross-entropy") and (first.dim() != 2 or first.shape[1] < 2):
        raise QCError(f"loss={loss_name} needs a classifier output (N x classes); output '{out_name}' has shape {list(first.shape)}", pass_name=pass_name, option="loss")
    return loss_name


def loss_reason(loss_name: str, data: DataSource, out_name: str, requested: str) -> str | None:
    """A sentence for the report when ``auto`` fell back to a label-free loss; else None."""
    if requested != "auto" or loss_name == "cross-entropy":
        return None
    if loss_name == "mse":
        why = "the data has no 'labels' and" if data.labels is None else "with labels, but"
        return f"{why} output '{out_name}' is not a classifier (N x classes): training on the mean squared error to the float model's outputs (distillation)"
    return "the data has no 'labels': training on the KL divergence to the float model's outputs (distillation)"


def training_loss(graph, ctx: PassContext, data: DataSource, out_name: str, requested: str, batch_size: int, pass_name: str) -> str:
    """`resolve_loss`, with `loss_reason`'s sentence noted in the report when ``auto`` fell back
    to a label-free loss: what every training pass calls before `fit`."""
    loss_name = resolve_loss(graph, data, out_name, requested, batch_size, pass_name)
    if (reason := loss_reason(loss_name, data, out_name, requested)) is not None:
        ctx.note(pass_name, reason)
    return loss_name


def task_loss(loss_name: str, out, labels: np.ndarray | None, reference):
    """Mean loss of a batch: cross-entropy against ``labels``, or KL / MSE against ``reference``."""
    import torch

    if loss_name == "cross-entropy":
        # A copy: labels sliced from a memory-mapped .npz are read-only, which torch warns about.
        return torch.nn.functional.cross_entropy(out, torch.tensor(np.asarray(labels), dtype=torch.int64))
    if loss_name == "kl":
        return torch.nn.functional.kl_div(torch.log_softmax(out, -1), torch.log_softmax(reference, -1), log_target=True, reduction="batchmean")
    if loss_name == "cross-entropy+kl":
        return task_loss("cross-entropy", out, labels, None) + task_loss("kl", out, None, reference)
    # Per sample the squared error summed over its outputs, averaged over the batch.
    return 0.5 * torch.mean(torch.sum((out - reference).reshape(len(out), -1) ** 2, dim=1))


def shuffled_batches(data: DataSource, batch_size: int, rng: np.random.Generator):
    """(inputs, labels) batches in a fresh random order; a fixed batch size drops the remainder."""
    step = data.fixed_batch or batch_size
    order = rng.permutation(data.usable_samples)
    for start in range(0, len(order), step):
        # Sorted within the batch: reads from a memory-mapped .npz stay sequential.
        idx = np.sort(order[start : start + step])
        if data.fixed_batch and len(idx) < step:
            break
        labels = None if data.labels is None else data.labels[idx]
        yield {k: np.ascontiguousarray(a[idx]) for k, a in data.arrays.items()}, labels


def steps_per_epoch(data: DataSource, batch_size: int) -> int:
    """Batches `shuffled_batches` yields per epoch (the last one partial unless the batch is fixed)."""
    step = data.fixed_batch or batch_size
    return max(-(-data.usable_samples // step), 1)


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The multiple of the base learning rate that 0-based optimizer ``step`` of ``total_steps`` uses.

    Warm-up first (step i < ``warmup_steps`` at (i+1)/(warmup_steps+1), rising to the full rate),
    then ``schedule`` over the remaining steps: ``cosine`` from 1 towards 0, ``step`` 1, then 0.1
    from half of them and 0.01 from three quarters, ``constant`` 1.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    i, n = step - warmup_steps, max(total_steps - warmup_steps, 1)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(i, n) / n))
    if schedule == "step":
        return 0.1 ** ((i >= 0.5 * n) + (i >= 0.75 * n))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule '{schedule}'")


def resident_memory_mib() -> float:
    """This process's resident memory now, in MiB (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


class MemorySampler:
    """Samples `resident_memory_mib` every ``interval`` seconds on a daemon thread while in use:
    the peak of one stretch of work, which the process-wide peak cannot give once something
    larger ran earlier."""

    def __init__(self, interval: float = 0.02) -> None:
        import threading

        self.interval, self.peak = interval, resident_memory_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, resident_memory_mib())

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_memory_mib())


def peak_memory_mib() -> float:
    """Peak resident memory of this process in MiB (0 where the platform cannot tell)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _make_optimizer(settings: TrainSettings, params: Mapping[str, Any] | list, lr_multipliers: Mapping[str, float] | None = None):
    """The optimizer over ``params``; a parameter named in ``lr_multipliers`` learns at that
    multiple of ``settings.lr`` (one group per distinct multiple, in first-seen order)."""
    import torch

    groups: dict[float, list] = {}
    for name, p in (params.items() if isinstance(params, Mapping) else enumerate(params)):
        groups.setdefault(float((lr_multipliers or {}).get(name, 1.0)), []).append(p)
    param_groups = [{"params": ps, "lr": settings.lr * m} for m, ps in groups.items()]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=settings.lr, momentum=settings.momentum, nesterov=False, weight_decay=settings.weight_decay)
    return torch.optim.Adam(param_groups, lr=settings.lr, weight_decay=settings.weight_decay)


def _base_lr(optimizer, settings: TrainSettings) -> float:
    """``settings.lr`` as the schedule has scaled it now (whatever a group's multiplier)."""
    group = optimizer.param_groups[0]
    return settings.lr * group["lr"] / group.get("initial_lr", group["lr"]) if group.get("initial_lr") else group["lr"]


# --- checkpoints -------------------------------------------------------------------------------

#: The options whose change makes a checkpoint's optimizer state, schedule or parameters mean
#: something else, in the order a mismatch is reported.
_FINGERPRINT_OPTIONS = ("lr", "batch_size", "optimizer", "momentum", "weight_decay", "schedule", "warmup_steps", "epochs", "loss", "augment")


def fingerprint(params: Mapping[str, Any], settings: TrainSettings, loss_name: str, samples: int) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the trainable tensors (names and shapes, in
    the optimizer's order), the optimisation options (``loss`` as resolved) and the sample count
    (it fixes the steps per epoch, hence the schedule)."""
    fp: dict[str, Any] = {"parameters": [[name, list(p.shape)] for name, p in params.items()]}
    for key in _FINGERPRINT_OPTIONS:
        fp[key] = loss_name if key == "loss" else getattr(settings, key)
    fp["samples"] = samples
    return fp


def _fingerprint_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """'lr=0.001, this run has lr=0.01' for the first item that differs; None if none does."""
    old_params = [(n, tuple(s)) for n, s in saved.get("parameters", [])]
    new_params = [(n, tuple(s)) for n, s in current["parameters"]]
    if old_params != new_params:
        for (old_name, old_shape), (new_name, new_shape) in zip(old_params, new_params):
            if old_name != new_name:
                return f"trainable tensor '{old_name}', this run has '{new_name}' in its place"
            if old_shape != new_shape:
                return f"'{old_name}' of shape {list(old_shape)}, this run has shape {list(new_shape)}"
        return f"{len(old_params)} trainable tensors, this run has {len(new_params)}"
    for key, value in current.items():
        if key == "parameters":
            continue
        old = saved.get(key, "<missing>")
        if old != value:
            name = key.replace("_", "-")
            return f"{name}={old}, this run has {name}={value}"
    return None


def checkpoint_file(folder: str, pass_name: str) -> Path:
    """The checkpoint a pass writes into (or resumes from) ``folder``; a path ending in .pt is the file itself."""
    path = Path(folder)
    return path if path.suffix == ".pt" else path / f"{pass_name}.pt"


def save_checkpoint(path: Path, state: Mapping[str, Any], pass_name: str) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, synced, then
    renamed over the old one, so an interrupt or a full disk never leaves a half-written checkpoint."""
    import torch

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QCError(f"cannot create the checkpoint folder: {exc.strerror or exc}", file=str(path.parent), pass_name=pass_name, option="checkpoint-dir") from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        # Whatever stopped the write (including Ctrl-C), the previous checkpoint is still whole.
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise QCError(f"cannot write the checkpoint: {exc.strerror or exc}", file=str(path), pass_name=pass_name, option="checkpoint-dir") from None
        raise


def load_checkpoint(resume: str, pass_name: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint file ``resume`` names and its contents; a clear QCError if it is missing or unreadable."""
    import torch

    path = checkpoint_file(resume, pass_name)
    if not path.is_file():
        folder = path.parent
        others = sorted(p.name for p in folder.glob("*.pt")) if folder.is_dir() else []
        found = f" (the folder holds: {', '.join(others)})" if others else ""
        raise QCError(f"no checkpoint to resume from: {path} does not exist{found}", file=str(path), pass_name=pass_name, option="resume")
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code to unpickle.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged or foreign file
        raise QCError(f"cannot read the checkpoint: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=str(path), pass_name=pass_name, option="resume") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise QCError("not a qcompiler training checkpoint (written by a checkpoint-dir option)", file=str(path), pass_name=pass_name, option="resume")
    return path, state


# --- the loop ----------------------------------------------------------------------------------


def fit(graph, ctx: PassContext, params: Mapping[str, object], held_zero: Mapping[str, np.ndarray], *, loss_name: str, out_name: str,
        reference_overrides: Mapping[str, object], settings: TrainSettings, label: str, pass_name: str,
        before_step: Callable[[int, int], None] | None = None, penalty: Callable[[], Any] | None = None,
        lr_multipliers: Mapping[str, float] | None = None, channels_last: bool = False) -> TrainResult:
    """Train ``params`` (torch parameters of ``graph`` by initializer name) on ``ctx.data``.

    ``held_zero`` maps a parameter name to a boolean mask of entries that get no gradient and are
    reset to exactly 0 after every step. The label-free losses compare against ``graph`` run with
    ``reference_overrides`` (the float values of what is being trained).

    Shuffling and augmentation draw from ``ctx.seed``, and so does torch's own generator (forked,
    so the caller's torch RNG is left as it was): the same seed gives the same losses. With
    ``settings.max_minutes`` the loop stops between steps once the budget is spent and restores
    the best completed epoch's parameters; ``settings.checkpoint_dir`` and ``settings.resume``
    save and continue runs. A KeyboardInterrupt propagates unchanged, leaving the last completed
    epoch's checkpoint in place. Returns the loss history, timings and how training ended.

    ``before_step(step, total_steps)`` runs before every step (a schedule of the pass's own, such
    as SLB's softmax sharpness; the step count continues across a resume). ``penalty()`` is added
    to every step's loss (a regulariser such as learn-bits' size term; the epoch losses include it).
    ``lr_multipliers`` scales the learning rate of the parameters it names (the schedule applies
    to all alike); the progress bar and ``step_lrs`` show the base rate.

    ``channels_last`` stores the 4-D parameters and image batches in NHWC memory order (see
    `_channels_last`); for passes whose parameters are the graph's own weights (finetune-weights),
    not the quantizer state the other training passes wrap around them.
    """
    import torch

    data = ctx.data
    assert data is not None
    if settings.augment != "none" and not image_inputs(data.arrays):
        raise QCError(f"augment={settings.augment} needs an image input (float, shape N x C x H x W with H, W >= 8); "
                      f"inputs here: {', '.join(f'{k} {a.shape}' for k, a in data.arrays.items())}", pass_name=pass_name, option="augment")
    images_in = image_inputs(data.arrays) if channels_last else []
    if images_in:
        # The parameters in place (the graph and the optimizer hold these objects), the reference
        # values in a dict of our own.
        for p in params.values():
            p.data = _channels_last(p.data)
        reference_overrides = {name: _channels_last(t) for name, t in reference_overrides.items()}
    keep = {name: torch.from_numpy(~mask).to(params[name].dtype) for name, mask in held_zero.items() if mask.any()}
    optimizer = _make_optimizer(settings, params, lr_multipliers)
    per_epoch = steps_per_epoch(data, settings.batch_size)
    total_steps = settings.epochs * per_epoch
    # A plain function, not stored in the scheduler's state: it is rebuilt from the options, which
    # the checkpoint's fingerprint pins.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(settings.schedule, i, total_steps, settings.warmup_steps))
    rng = np.random.default_rng(ctx.seed)
    fp = fingerprint(params, settings, loss_name, data.usable_samples)
    save_to = checkpoint_file(settings.checkpoint_dir, pass_name) if settings.checkpoint_dir else None
    budget = settings.max_minutes * 60
    track_best = budget > 0

    losses: list[float] = []
    epoch_seconds: list[float] = []
    step_lrs: list[float] = []
    first_epoch = steps_done = 0
    best_loss, best_epoch, best_params = math.inf, None, None
    resumed_state = None
    if settings.resume:
        path, resumed_state = load_checkpoint(settings.resume, pass_name)
        mismatch = _fingerprint_mismatch(resumed_state.get("fingerprint", {}), fp)
        if mismatch:
            kind = "file" if Path(settings.resume).suffix == ".pt" else "folder"
            raise QCError(f"resume {kind} {settings.resume} was written for {mismatch}", file=str(path), pass_name=pass_name, option="resume")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(resumed_state["params"][name])
        optimizer.load_state_dict(resumed_state["optimizer"])
        scheduler.load_state_dict(resumed_state["scheduler"])
        rng.bit_generator.state = resumed_state["numpy_rng"]
        first_epoch, steps_done = int(resumed_state["epoch"]), int(resumed_state["steps"])
        losses, epoch_seconds = list(resumed_state["losses"]), list(resumed_state["epoch_seconds"])
        if track_best and resumed_state.get("best") is not None:
            best_loss, best_epoch = float(resumed_state["best"]["loss"]), int(resumed_state["best"]["epoch"])
            best_params = resumed_state["best"]["params"]
        elif track_best and losses:
            # The checkpoint's parameters are those of its last epoch, the only one it can vouch for.
            best_loss, best_epoch = losses[-1], first_epoch
            best_params = {name: p.detach().clone() for name, p in params.items()}
        ctx.note(pass_name, f"resumed from {path} after epoch {first_epoch} of {settings.epochs}")

    stop_reason, images = "", 0
    hooks = [params[name].register_hook(lambda g, k=k: g * k) for name, k in keep.items()]
    sampler = MemorySampler().__enter__()
    start = _clock()
    try:
        # Forked: seeding torch here must not change the random stream of whoever called us.
        with torch.random.fork_rng(devices=[]), ctx.progress(label, total_steps) as progress:
            torch.manual_seed(ctx.seed)
            if resumed_state is not None:
                torch.set_rng_state(resumed_state["torch_rng"])
            if first_epoch:
                progress.advance(first_epoch * per_epoch)
            # Optional on progress objects (older factories only have advance).
            describe = getattr(progress, "describe", None)
            for epoch in range(first_epoch, settings.epochs):
                epoch_start = _clock()
                epoch_loss, seen = 0.0, 0
                out_of_time = False
                for batch, labels in shuffled_batches(data, settings.batch_size, rng):
                    batch = augment_batch(batch, settings.augment, rng)
                    if images_in:
                        batch = {k: _channels_last_batch(v) if k in images_in else v for k, v in batch.items()}
                    if before_step is not None:
                        before_step(steps_done, total_steps)
                    out = graph.run(batch, [out_name])[out_name]
                    reference = None
                    if loss_name != "cross-entropy":
                        with torch.no_grad():
                            reference = graph.run(batch, [out_name], overrides=reference_overrides)[out_name]
                    loss = task_loss(loss_name, out, labels, reference)
                    if penalty is not None:
                        loss = loss + penalty()
                    optimizer.zero_grad()
                    loss.backward()
                    step_lrs.append(_base_lr(optimizer, settings))
                    optimizer.step()
                    scheduler.step()
                    with torch.no_grad():
                        for name, k in keep.items():
                            params[name].mul_(k)
                    epoch_loss, seen = epoch_loss + loss.item(), seen + 1
                    steps_done += 1
                    images += len(labels) if labels is not None else len(next(iter(batch.values())))
                    if describe is not None:
                        rate = images / max(_clock() - start, 1e-9)
                        describe(f"{label}: epoch {epoch + 1}/{settings.epochs}, loss {epoch_loss / seen:.4g}, lr {step_lrs[-1]:.3g}, {rate:.0f} img/s")
                    progress.advance()
                    if budget and _clock() - start >= budget:
                        out_of_time = True
                        break
                if out_of_time and seen < per_epoch:
                    stop_reason = (f"max-minutes={settings.max_minutes:g} spent after {steps_done} of {total_steps} steps, "
                                   f"{seen} of {per_epoch} into epoch {epoch + 1} of {settings.epochs}")
                    break
                losses.append(epoch_loss / max(seen, 1))
                epoch_seconds.append(_clock() - epoch_start)
                if track_best and losses[-1] < best_loss:
                    best_loss, best_epoch = losses[-1], epoch + 1
                    best_params = {name: p.detach().clone() for name, p in params.items()}
                if save_to is not None:
                    save_checkpoint(save_to, {
                        "format": CHECKPOINT_FORMAT, "fingerprint": fp, "epoch": epoch + 1, "steps": steps_done,
                        "params": {name: p.detach() for name, p in params.items()},
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                        "losses": losses, "epoch_seconds": epoch_seconds,
                        "best": {"loss": best_loss, "epoch": best_epoch, "params": best_params} if best_params is not None else None,
                    }, pass_name)
                # Checked again after the checkpoint: writing it also spends the budget.
                if budget and epoch + 1 < settings.epochs and _clock() - start >= budget:
                    stop_reason = f"max-minutes={settings.max_minutes:g} spent after epoch {epoch + 1} of {settings.epochs} ({steps_done} of {total_steps} steps)"
                    break
    finally:
        for hook in hooks:
            hook.remove()
        sampler.__exit__()
    seconds = _clock() - start

    restored = None
    if stop_reason:
        if best_params is not None:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(best_params[name])
            restored = best_epoch
            ctx.note(pass_name, f"stopped early: {stop_reason}; kept the parameters of epoch {best_epoch} (lowest mean training loss, {best_loss:.4g})", level="warning")
        else:
            ctx.note(pass_name, f"stopped early: {stop_reason}; max-minutes={settings.max_minutes:g} is too short for one epoch "
                                f"({per_epoch} steps), so there is no completed epoch to compare: keeping the parameters of the last step", level="warning")
    return TrainResult(
        losses=losses, epoch_seconds=epoch_seconds, step_lrs=step_lrs, epochs_completed=len(losses), steps=steps_done,
        images_per_second=images / seconds if images and seconds > 0 else 0.0, peak_memory_mib=peak_memory_mib(), training_peak_memory_mib=sampler.peak,
        final_lr=step_lrs[-1] if step_lrs else _base_lr(optimizer, settings), stopped_early=bool(stop_reason), stop_reason=stop_reason,
        restored_epoch=restored, resumed_from_epoch=first_epoch, checkpoint=str(save_to) if save_to is not None and losses[first_epoch:] else "")


def _channels_last(t):
    """A 4-D tensor in NHWC memory order (anything else as it is).

    oneDNN's CPU convolutions run about 1.5x faster on channels-last tensors than on NCHW ones
    (ResNet-32's 3x3 convolutions, forward and backward: a training step 15-20 % faster in all).
    Only the memory order changes: every op sees the same logical NCHW tensor.
    """
    import torch

    if isinstance(t, torch.Tensor) and t.dim() == 4:
        return t.detach().contiguous(memory_format=torch.channels_last)
    return t


def _channels_last_batch(images: np.ndarray):
    """An image batch as a channels-last float torch tensor (see `_channels_last`)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 2, 3, 1))).permute(0, 3, 1, 2)


def write_back(model: ir.Model, params: Mapping[str, object]) -> dict[str, float]:
    """Store trained ``params`` as the model's float32 initializers; the largest change of each."""
    moved = {}
    for name, p in params.items():
        # C order: a channels-last parameter's numpy view has NHWC strides.
        values = np.array(p.detach().numpy(), dtype=np.float32, order="C")
        moved[name] = float(np.max(np.abs(values - model.graph.initializers[name].const_value.numpy())))
        model.graph.initializers[name].const_value = ir.tensor(values, name=name)
    return moved
