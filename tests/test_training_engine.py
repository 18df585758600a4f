"""The shared training engine (`qcompiler.training.fit`): optimizers, schedules, the time budget,
checkpoint and resume, seeding, the run statistics and the progress description, on a small CNN."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch

from qcompiler import training
from qcompiler.data import DataSource
from qcompiler.errors import QCError
from qcompiler.pass_manager import PassContext, null_progress
from qcompiler.pipeline import format_pass, parse_pipeline
from qcompiler.targets.spec import load_target
from qcompiler.torch_exec import TorchGraph
from qcompiler.training import TrainSettings, fit, lr_factor
from tests.helpers import small_cnn

NAMES = ["w0", "b0", "wa", "ba", "wb", "bb", "wc", "bc", "wd", "bd", "wf", "bf"]
SAMPLES, BATCH = 32, 8
PER_EPOCH = SAMPLES // BATCH


def _data() -> DataSource:
    rng = np.random.default_rng(1)
    return DataSource({"input": rng.normal(0, 1, (SAMPLES, 3, 8, 8)).astype(np.float32)}, rng.integers(0, 5, SAMPLES))


def _ctx(seed: int = 0, progress=null_progress) -> PassContext:
    return PassContext(target=load_target("ort-cpu"), data=_data(), seed=seed, progress=progress)


def _train(settings: TrainSettings, ctx: PassContext | None = None, held_zero=None):
    """Fit small_cnn's weights on the random data; (graph, params, result, ctx)."""
    ctx = ctx or _ctx()
    graph = TorchGraph(small_cnn(), trainable=NAMES)
    params = graph.named_weights()
    result = fit(graph, ctx, params, held_zero or {}, loss_name="cross-entropy", out_name="logits", reference_overrides={},
                 settings=settings, label="training", pass_name="finetune-weights")
    return graph, params, result, ctx


def _full_loss(graph) -> float:
    data = _data()
    with torch.no_grad():
        out = graph.run({"input": data.arrays["input"]}, ["logits"])["logits"]
    return float(torch.nn.functional.cross_entropy(out, torch.from_numpy(data.labels.astype(np.int64))))


def _snapshot(params) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in params.items()}


class _Recorder:
    """A progress factory that calls ``on_step(step)`` after every step and records descriptions."""

    def __init__(self, on_step=None) -> None:
        self.on_step = on_step or (lambda step: None)
        self.steps = 0
        self.texts: list[str] = []

    @contextmanager
    def __call__(self, label: str, total: int | None):
        recorder = self

        class _Bar:
            def advance(self, n: int = 1) -> None:
                for _ in range(n):
                    recorder.steps += 1
                    recorder.on_step(recorder.steps)

            def describe(self, text: str) -> None:
                recorder.texts.append(text)

        yield _Bar()


def test_default_settings_are_adam_cosine_without_limits() -> None:
    s = TrainSettings()
    assert (s.optimizer, s.momentum, s.weight_decay, s.schedule, s.warmup_steps, s.max_minutes, s.checkpoint_dir, s.resume) == \
        ("adam", 0.9, 0.0, "cosine", 0, 0, "", "")


@pytest.mark.parametrize("options", [{"optimizer": "adam", "lr": 0.01}, {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}])
def test_sgd_and_adam_both_lower_the_loss(options) -> None:
    before = _full_loss(TorchGraph(small_cnn()))
    graph, _, result, _ = _train(TrainSettings(epochs=6, batch_size=BATCH, **options))
    assert _full_loss(graph) < 0.9 * before
    assert result.losses[-1] < result.losses[0]
    assert result.epochs_completed == 6 and result.steps == 6 * PER_EPOCH and not result.stopped_early


def test_sgd_is_plain_momentum_sgd() -> None:
    graph = TorchGraph(small_cnn(), trainable=NAMES)
    opt = training._make_optimizer(TrainSettings(optimizer="sgd", lr=0.1, momentum=0.5, weight_decay=0.01), list(graph.named_weights().values()))
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD) and group["momentum"] == 0.5 and group["nesterov"] is False and group["weight_decay"] == 0.01


def test_step_schedule_drops_tenfold_at_half_and_three_quarters() -> None:
    assert [lr_factor("step", i, 8) for i in range(8)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    _, _, result, _ = _train(TrainSettings(epochs=4, batch_size=BATCH, lr=0.01, schedule="step"))
    lrs = result.step_lrs
    assert len(lrs) == 16
    assert lrs[7] == pytest.approx(0.01) and lrs[8] == pytest.approx(0.001)   # boundary at 50 %
    assert lrs[11] == pytest.approx(0.001) and lrs[12] == pytest.approx(1e-4)  # and at 75 %
    assert result.final_lr == pytest.approx(1e-4)


def test_warmup_rises_linearly_then_the_schedule_runs_over_the_rest() -> None:
    assert [lr_factor("constant", i, 10, 3) for i in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1, 1])
    assert [lr_factor("step", i, 10, 2) for i in (2, 5, 6, 7, 8)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert lr_factor("cosine", 2, 10, 2) == 1 and lr_factor("cosine", 6, 10, 2) == pytest.approx(0.5)
    # Without warm-up, cosine is the factor the loop has always used.
    assert [lr_factor("cosine", i, 7) for i in range(7)] == [0.5 * (1 + np.cos(np.pi * i / 7)) for i in range(7)]


def test_a_tiny_time_budget_stops_after_the_first_step_and_keeps_those_weights() -> None:
    # Each step takes at least 10 ms here, past 0.0001 minutes (6 ms) from the start.
    ctx = _ctx(progress=_Recorder(lambda step: time.sleep(0.01)))
    _, params, result, _ = _train(TrainSettings(epochs=3, batch_size=BATCH, lr=0.01, max_minutes=0.0001), ctx)
    assert result.stopped_early and result.steps == 1 and result.epochs_completed == 0 and result.losses == []
    assert result.restored_epoch is None and "1 of 4 into epoch 1" in result.stop_reason
    assert any("too short for one epoch" in d.message for d in ctx.diagnostics)
    assert not np.array_equal(_snapshot(params)["w0"], small_cnn().graph.initializers["w0"].const_value.numpy())
    assert result.stats()["stopped_early"] is True


def test_the_time_budget_restores_the_best_completed_epoch(monkeypatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(training, "_clock", lambda: clock[0])
    ends: dict[int, dict[str, np.ndarray]] = {}
    params_box: dict = {}

    def step(n: int) -> None:
        clock[0] += 1.0  # every step "takes" one second
        if n % PER_EPOCH == 0:
            ends[n // PER_EPOCH] = _snapshot(params_box["params"])

    graph = TorchGraph(small_cnn(), trainable=NAMES)
    params_box["params"] = params = graph.named_weights()
    ctx = _ctx(progress=_Recorder(step))
    # Budget: two epochs and half a step, so the first step of epoch 3 spends it.
    settings = TrainSettings(epochs=5, batch_size=BATCH, lr=0.05, max_minutes=(2 * PER_EPOCH + 0.5) / 60)
    result = fit(graph, ctx, params, {}, loss_name="cross-entropy", out_name="logits", reference_overrides={}, settings=settings, label="t", pass_name="p")
    assert result.stopped_early and result.epochs_completed == 2 and result.steps == 2 * PER_EPOCH + 1
    best = int(np.argmin(result.losses)) + 1
    assert result.restored_epoch == best
    restored = _snapshot(params)
    assert all(np.array_equal(restored[n], ends[best][n]) for n in NAMES)
    assert any("stopped early" in d.message and f"epoch {best}" in d.message for d in ctx.diagnostics)


def test_a_budget_that_is_never_spent_changes_nothing() -> None:
    _, p1, r1, _ = _train(TrainSettings(epochs=2, batch_size=BATCH, lr=0.01))
    _, p2, r2, _ = _train(TrainSettings(epochs=2, batch_size=BATCH, lr=0.01, max_minutes=10))
    assert r1.losses == r2.losses and not r2.stopped_early
    assert all(np.array_equal(a, b) for a, b in zip(_snapshot(p1).values(), _snapshot(p2).values()))


def test_a_checkpoint_each_epoch_and_resume_matches_an_uninterrupted_run(tmp_path) -> None:
    settings = TrainSettings(epochs=3, batch_size=BATCH, lr=0.01, optimizer="sgd", augment="crop-flip", warmup_steps=2)
    _, straight, straight_result, _ = _train(settings, _ctx(seed=4))

    folder = tmp_path / "ck"
    seen_epochs = []

    def interrupt(step: int) -> None:
        if step % PER_EPOCH == 1 and step > 1:  # first step of a new epoch: the last one is saved
            seen_epochs.append(torch.load(folder / "finetune-weights.pt", weights_only=True)["epoch"])
        if step == PER_EPOCH + 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(replace(settings, checkpoint_dir=str(folder)), _ctx(seed=4, progress=_Recorder(interrupt)))
    assert seen_epochs == [1]
    assert torch.load(folder / "finetune-weights.pt", weights_only=True)["epoch"] == 1
    assert [p.name for p in folder.iterdir()] == ["finetune-weights.pt"]  # no temporary file left

    # A different seed on resume changes nothing: the random state comes from the checkpoint.
    ctx = _ctx(seed=99)
    _, resumed, result, _ = _train(replace(settings, checkpoint_dir=str(folder), resume=str(folder)), ctx)
    assert result.resumed_from_epoch == 1 and result.epochs_completed == 3 and result.steps == 3 * PER_EPOCH
    assert len(result.step_lrs) == 2 * PER_EPOCH and result.step_lrs == straight_result.step_lrs[PER_EPOCH:]
    assert result.losses == pytest.approx(straight_result.losses, abs=1e-6)
    for name in NAMES:
        np.testing.assert_allclose(_snapshot(resumed)[name], _snapshot(straight)[name], atol=1e-6, rtol=0)
    assert torch.load(folder / "finetune-weights.pt", weights_only=True)["epoch"] == 3
    assert any("resumed from" in d.message for d in ctx.diagnostics)


def test_resume_refuses_a_checkpoint_of_other_options(tmp_path) -> None:
    _train(TrainSettings(epochs=1, batch_size=BATCH, lr=0.001, checkpoint_dir=str(tmp_path)))
    with pytest.raises(QCError, match=r"was written for lr=0\.001, this run has lr=0\.01") as info:
        _train(TrainSettings(epochs=1, batch_size=BATCH, lr=0.01, resume=str(tmp_path)))
    assert info.value.option == "resume" and "finetune-weights.pt" in str(info.value)
    with pytest.raises(QCError, match="optimizer=adam, this run has optimizer=sgd"):
        _train(TrainSettings(epochs=1, batch_size=BATCH, lr=0.001, optimizer="sgd", resume=str(tmp_path)))


def test_resume_refuses_a_checkpoint_of_other_tensors(tmp_path) -> None:
    _train(TrainSettings(epochs=1, batch_size=BATCH, checkpoint_dir=str(tmp_path)))
    graph = TorchGraph(small_cnn(), trainable=NAMES[:4])
    with pytest.raises(QCError, match="was written for .*trainable tensor"):
        fit(graph, _ctx(), graph.named_weights(), {}, loss_name="cross-entropy", out_name="logits", reference_overrides={},
            settings=TrainSettings(epochs=1, batch_size=BATCH, resume=str(tmp_path)), label="t", pass_name="finetune-weights")


def test_resume_from_a_missing_or_damaged_checkpoint_names_the_file(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(QCError, match=r"no checkpoint to resume from: .*nowhere/finetune-weights\.pt does not exist"):
        _train(TrainSettings(epochs=1, batch_size=BATCH, resume=str(missing)))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(QCError, match="cannot read the checkpoint") as info:
        _train(TrainSettings(epochs=1, batch_size=BATCH, resume=str(bad)))
    assert info.value.file == str(bad)


def test_the_same_seed_gives_the_same_losses_and_leaves_torch_rng_alone() -> None:
    settings = TrainSettings(epochs=2, batch_size=BATCH, lr=0.01, augment="crop-flip")
    torch.manual_seed(123)
    outside = torch.get_rng_state()
    a = _train(settings, _ctx(seed=7))[2].losses
    assert torch.equal(torch.get_rng_state(), outside)  # forked, not reseeded for the caller
    b = _train(settings, _ctx(seed=7))[2].losses
    c = _train(settings, _ctx(seed=8))[2].losses
    assert a == b and a != c


def test_stats_and_the_progress_description() -> None:
    recorder = _Recorder()
    _, _, result, _ = _train(TrainSettings(epochs=2, batch_size=BATCH, lr=0.01), _ctx(progress=recorder))
    stats = result.stats()
    assert len(stats["seconds_per_epoch"]) == 2 and all(s >= 0 for s in stats["seconds_per_epoch"])
    assert stats["images_per_second"] > 0 and stats["peak_memory_mib"] > 10 and stats["stopped_early"] is False
    assert stats["final_lr"] == pytest.approx(result.step_lrs[-1]) and stats["steps"] == 2 * PER_EPOCH
    assert recorder.steps == 2 * PER_EPOCH and len(recorder.texts) == 2 * PER_EPOCH
    assert all(k in recorder.texts[-1] for k in ("epoch 2/2", "loss ", "lr ", "img/s"))


def test_the_cli_progress_bar_shows_descriptions() -> None:
    from qcompiler.cli import _progress

    with _progress("bar", 2) as bar:
        bar.advance()
        bar.describe("loss [0.5] lr 1e-3")
        bar.advance()
    with null_progress("x", 1) as bar:
        bar.describe("ignored")


def test_the_options_parse_from_a_pipeline_and_reach_the_pass_stats(tmp_path) -> None:
    text = f"finetune-weights{{epochs=2,batch-size=8,lr=0.01,optimizer=sgd,momentum=0.8,weight-decay=0.0001,schedule=step,warmup-steps=1,max-minutes=5,checkpoint-dir={tmp_path}}}"
    pipeline = parse_pipeline(text)
    options = pipeline.passes[0].options
    assert (options.optimizer, options.momentum, options.weight_decay, options.schedule, options.warmup_steps, options.max_minutes) == ("sgd", 0.8, 1e-4, "step", 1, 5.0)
    assert parse_pipeline(format_pass(pipeline.passes[0])).passes[0].options == options
    ctx = _ctx()
    pipeline.run(small_cnn(), ctx)
    stats = ctx.stats["finetune-weights"]
    assert stats["epochs_completed"] == 2 and stats["stopped_early"] is False and len(stats["seconds_per_epoch"]) == 2
    assert {"images_per_second", "peak_memory_mib", "final_lr", "steps"} <= set(stats)
    assert (tmp_path / "finetune-weights.pt").is_file() and stats["checkpoint"] == str(tmp_path / "finetune-weights.pt")


@pytest.mark.parametrize("bad", ["optimizer=rmsprop", "schedule=linear", "momentum=1", "weight-decay=-1", "warmup-steps=-1", "max-minutes=-1"])
def test_bad_options_are_refused(bad) -> None:
    with pytest.raises(QCError):
        parse_pipeline(f"finetune-weights{{{bad}}}")


def test_the_result_still_reads_as_the_loss_list() -> None:
    result = _train(TrainSettings(epochs=2, batch_size=BATCH, lr=0.01))[2]
    assert list(result) == result.losses and len(result) == 2 and result[-1] == result.losses[-1]
