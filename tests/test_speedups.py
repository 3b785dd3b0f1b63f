"""The training speed-ups change how a step is computed, never what it computes: both tasks in
one forward pass, the output layer at target tokens only, length-grouped batches, and the
encoder run once per input (task marker on the decoder side). Tiny models, fp32."""

import json
import tempfile
from pathlib import Path

import pytest
import torch

from stepdistill.config import MethodConfig, TrainingConfig
from stepdistill.errors import StepDistillError
from stepdistill.evaluation import load_trained, predict
from stepdistill.methods import get_method
from stepdistill.methods.formatting import Format, encode_example
from stepdistill.memory import resolve_bf16
from stepdistill.students import Student
from stepdistill.methods.targets import logits_at, target_positions
from stepdistill.methods.batches import feature_length, stack_padded
from stepdistill.training import build_trainer, fit
from stepdistill.training.speedups import FastDropout, LengthGroupedSampler, use_fast_dropout, use_fused_gelu
from tiny_models import FakeTask, annotations, examples, llama_student, t5_student

STUDENTS = {"t5": t5_student, "llama": llama_student}
SBS = MethodConfig(name="step-by-step", alpha=0.5)
PLAIN = dict(fuse_tasks=False, target_logits_only=False, fused_loss=False, group_by_length=False)  # the paper's way


def _records(n=8, bad=frozenset({"ex3"})):
    exs = examples(n)
    return get_method(SBS).records(exs, annotations(exs, bad=set(bad))).records


def _loss_and_grads(make, training, method=SBS, records=None):
    """compute_loss on one collated batch of 8 (one row without a rationale), and its gradients."""
    student = make(seed=0)
    trainer = build_trainer(student, method, training, records or _records(), [], None, _tmp(), progress=False)
    model = trainer.model.train()
    torch.manual_seed(0)
    for m in model.modules():  # dropout off: the two ways must see the same network
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = trainer.data_collator(trainer.train_dataset[:8])
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    parts = {k: float(v) for k, v in trainer._part_sums.items()}
    return float(loss), parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


_TMP = tempfile.TemporaryDirectory(prefix="stepdistill-test-speedups-")  # removed, with all below it, at exit


def _tmp():
    return Path(tempfile.mkdtemp(dir=_TMP.name))


@pytest.mark.parametrize("kind", ["t5", "llama"])
@pytest.mark.parametrize("fuse, targets_only, fused_loss", [(True, True, True), (True, True, False), (True, False, True),
                                                             (False, True, True), (False, True, False)])
def test_each_speedup_computes_the_same_loss_and_gradients(kind, fuse, targets_only, fused_loss):
    ref_loss, ref_parts, ref_grads = _loss_and_grads(STUDENTS[kind], TrainingConfig(bf16=False, **PLAIN))
    fast = TrainingConfig(bf16=False, fuse_tasks=fuse, target_logits_only=targets_only, fused_loss=fused_loss,
                          group_by_length=False)
    loss, parts, grads = _loss_and_grads(STUDENTS[kind], fast)
    assert ref_loss > 0.1
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert parts == pytest.approx(ref_parts, rel=1e-5)  # label and rationale loss each
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-6, rtol=1e-4, msg=k)


def test_target_positions_and_logits_at_score_only_targets():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    keep, targets = target_positions(labels, shift=False)
    assert keep.sum() == 3 and targets.tolist() == [5, 6, 7]
    keep, targets = target_positions(labels, shift=True)  # position t predicts token t + 1
    assert keep.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert targets.tolist() == [5, 6, 7]

    student = llama_student()
    ids = torch.randint(5, min(50, student.model.config.vocab_size), (2, 4))
    full = student.model(input_ids=ids).logits
    with logits_at(student.model, keep):
        some = student.model(input_ids=ids).logits
    assert some.shape == (3, full.shape[-1])
    torch.testing.assert_close(some, full[keep])
    assert student.model(input_ids=ids).logits.shape == full.shape  # the hook is gone afterwards


def test_stack_padded_pads_the_narrower():
    a, b = torch.ones(2, 3, dtype=torch.long), torch.full((1, 5), 2)
    out = stack_padded(a, b, -100)
    assert out.tolist() == [[1, 1, 1, -100, -100], [1, 1, 1, -100, -100], [2, 2, 2, 2, 2]]


def test_length_grouped_batches_waste_less_padding_and_are_reproducible():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (400,), generator=g).tolist()
    sampler = LengthGroupedSampler(lengths, 8, seed=42)
    order = list(sampler)
    assert sorted(order) == list(range(400))
    assert order == list(LengthGroupedSampler(lengths, 8, seed=42))  # same seed, same epoch: same order
    sampler.set_epoch(1)
    assert list(sampler) != order  # a new epoch reshuffles

    def padding(idx):
        batches = [idx[i:i + 8] for i in range(0, len(idx), 8)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)

    shuffled = torch.randperm(400, generator=g).tolist()
    assert padding(order) < 0.2 * padding(shuffled)


def test_feature_length_counts_both_tasks():
    assert feature_length({"input_ids": [1, 2], "labels": [3], "rat_input_ids": [1, 2, 3], "rat_labels": [4, 5],
                           "rat_index": 0}) == 8


def test_bf16_default_follows_the_hardware(monkeypatch):
    assert resolve_bf16(True) is True and resolve_bf16(False) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("pathlib.Path.read_text", lambda self: "flags : fpu avx2 avx512f")
    assert resolve_bf16(None) is False  # emulated bf16 would be slower than float32
    monkeypatch.setattr("pathlib.Path.read_text", lambda self: "flags : fpu avx2 avx512f avx512_bf16")
    assert resolve_bf16(None) is True


def test_bf16_asked_for_on_a_cpu_without_fast_bf16_is_kept_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("pathlib.Path.read_text", lambda self: "flags : fpu avx2 avx512f")
    with caplog.at_level("WARNING", logger="stepdistill"):
        assert resolve_bf16(True) is True  # a config that asks for bf16 gets it: it may be reproducing a bf16 run
    assert "emulated" in caplog.text and "training.bf16: auto" in caplog.text
    caplog.clear()
    monkeypatch.setattr("pathlib.Path.read_text", lambda self: "flags : fpu avx2 amx_bf16")
    with caplog.at_level("WARNING", logger="stepdistill"):
        assert resolve_bf16(True) is True and resolve_bf16(False) is False
    assert caplog.text == ""

    def unreadable(self):
        raise OSError("no /proc here")

    monkeypatch.setattr("pathlib.Path.read_text", unreadable)  # not Linux: nothing known, nothing claimed
    with caplog.at_level("WARNING", logger="stepdistill"):
        assert resolve_bf16(True) is True and resolve_bf16(None) is False
    assert caplog.text == ""


# --- encode once: the task marker on the decoder side ----------------------------------------


DECODER = MethodConfig(name="step-by-step", alpha=0.5, task_marker="decoder")


def test_decoder_marker_layout():
    student = t5_student()
    fmt = Format(kind="seq2seq", task_marker="decoder")
    f = encode_example(student.tokenizer, fmt, "explain: ", "2 + 3", "five", decoder_start=0)
    plain = encode_example(student.tokenizer, Format(kind="seq2seq"), "explain: ", "2 + 3", "five")
    n_marker = len(f["labels"]) - len(plain["labels"])
    assert n_marker > 0 and f["labels"][:n_marker] == [-100] * n_marker  # the marker is forced, not learned
    assert f["labels"][n_marker:] == plain["labels"]
    assert f["decoder_input_ids"][0] == 0 and f["decoder_input_ids"][1:] == [*student.tokenizer(
        "explain: ", add_special_tokens=False)["input_ids"], *plain["labels"][:-1]]
    assert len(f["input_ids"]) < len(plain["input_ids"])  # no prefix in the source


def test_encode_once_runs_the_encoder_once_per_step_and_matches_two_passes():
    calls = []
    student = t5_student()
    student.model.get_encoder().register_forward_hook(lambda *a: calls.append(1))
    trainer = build_trainer(student, DECODER, TrainingConfig(bf16=False, **PLAIN), _records(), [], None, _tmp(),
                            progress=False)
    for m in trainer.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = trainer.data_collator(trainer.train_dataset[:8])
    assert torch.equal(batch["input_ids"][batch["rat_index"]], batch["rat_input_ids"])  # one source per input
    once = trainer.compute_loss(trainer.model, batch)
    assert len(calls) == 1
    trainer.encode_once = False  # the same decoder-marker batch, each task encoding its own copy
    twice = trainer.compute_loss(trainer.model, batch)
    assert len(calls) == 3
    assert float(once) == pytest.approx(float(twice), rel=1e-5)


def test_decoder_marker_trains_saves_and_predicts(tmp_path):
    exs = examples(16)
    records = get_method(DECODER).records(exs, annotations(exs)).records
    training = TrainingConfig(max_steps=30, learning_rate=1e-2, batch_size=8, logging_steps=5, bf16=False)
    m = fit(t5_student(), DECODER, training, records, exs[:8], FakeTask(), tmp_path / "run", progress=False)
    losses = [x for _, x in m["train_loss"]]
    assert losses[-1] < 0.5 * losses[0]
    info = json.loads((tmp_path / "run" / "model" / "stepdistill.json").read_text())
    assert info["format"]["task_marker"] == "decoder"
    loaded, info = load_trained(tmp_path / "run")
    preds = predict(loaded, [e.input for e in exs[:8]], prefix=info["label_prefix"], max_new_tokens=8)
    assert FakeTask().accuracy(preds, exs[:8]) >= 0.5
    assert not any(p.startswith("predict") for p in preds)  # the forced marker is not part of the answer


def test_decoder_marker_needs_an_encoder_decoder(tmp_path):
    with pytest.raises(StepDistillError, match="task_marker=decoder needs an encoder-decoder student"):
        build_trainer(llama_student(), DECODER, TrainingConfig(), _records(), [], None, tmp_path, progress=False)
    with pytest.raises(ValueError, match="task_marker=decoder does not combine with kd"):
        MethodConfig(name="step-by-step", task_marker="decoder", kd={"teacher": "t"})


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fast_dropout_drops_at_rate_p_keeps_the_mean_and_its_gradient_is_the_mask(p):
    x = torch.randn(200, 1000, requires_grad=True)
    d = FastDropout(p)
    torch.manual_seed(0)
    y = d(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - p) < 0.005  # 200k draws: the standard error is about 0.001
    assert torch.allclose(y[y != 0], x[y != 0] / (1 - round(p * 65536) / 65536))
    ones = FastDropout(p)(torch.ones(400, 1000))
    assert abs(float(ones.mean()) - 1) < 0.01  # E[dropout(x)] = x
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() / (1 - round(p * 65536) / 65536))
    torch.manual_seed(0)
    assert torch.equal(FastDropout(p)(x.detach()), y.detach())  # a seed fixes the mask
    assert FastDropout(p).eval()(x) is x


def test_fast_dropout_in_bf16_scales_by_the_bf16_scale_and_a_seed_fixes_it():
    x = torch.randn(300, 1000).bfloat16()
    torch.manual_seed(1)
    y = FastDropout(0.1)(x)
    assert y.dtype == torch.bfloat16 and abs(float((y == 0).float().mean()) - 0.1) < 0.005
    scale = torch.tensor(1 / (1 - round(0.1 * 65536) / 65536), dtype=torch.bfloat16)
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * scale)
    torch.manual_seed(1)
    assert torch.equal(FastDropout(0.1)(x), y)
    assert not torch.equal(FastDropout(0.1)(x), y)  # the next call draws a new mask


def _with_dropout(student, p=0.1):
    for m in student.model.modules():
        if type(m) is torch.nn.Dropout:
            m.p = p
    return student


def test_fast_dropout_swaps_the_dropout_modules_and_is_on_without_a_gpu(tmp_path):
    student = _with_dropout(t5_student())
    n = sum(type(m) is torch.nn.Dropout for m in student.model.modules())
    assert n > 0 and use_fast_dropout(student.model) == n
    assert not any(type(m) is torch.nn.Dropout for m in student.model.modules())
    recs = get_method(MethodConfig(name="standard")).records(examples(8), None).records
    for fast, want in ((None, not torch.cuda.is_available()), (False, False)):
        s = _with_dropout(t5_student())
        build_trainer(s, MethodConfig(name="standard"), TrainingConfig(max_steps=1, bf16=False, fast_dropout=fast),
                      recs, [], None, tmp_path / str(fast))
        assert any(isinstance(m, FastDropout) for m in s.model.modules()) is want


def test_fused_gelu_swaps_pythons_tanh_gelu_for_the_same_function_and_is_on_by_default(tmp_path):
    """T5 v1.1's gated-gelu runs transformers' Python gelu_new; the swap gives the same outputs and
    gradients (float64: to rounding), and build_trainer makes it unless training.fused_gelu is off."""
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.activations import GELUTanh, NewGELUActivation

    def gated(seed=0):
        s = t5_student()
        torch.manual_seed(seed)
        cfg = {k: v for k, v in s.model.config.to_dict().items() if k not in ("dense_act_fn", "is_gated_act")}
        cfg = T5Config(**{**cfg, "feed_forward_proj": "gated-gelu"})
        return Student(T5ForConditionalGeneration(cfg).double(), s.tokenizer, is_seq2seq=True)

    batch = {"input_ids": torch.tensor([[5, 6, 7, 1]]), "labels": torch.tensor([[8, 9, 1]])}
    out = []
    for swap in (False, True):
        s = gated()
        if swap:
            assert use_fused_gelu(s.model) == 4  # 2 encoder + 2 decoder layers
            assert not any(isinstance(m, NewGELUActivation) for m in s.model.modules())
        loss = s.model(**batch).loss
        loss.backward()
        out.append((loss.detach(), [p.grad for p in s.model.parameters()]))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    recs = get_method(MethodConfig(name="standard")).records(examples(8), None).records
    for fused in (True, False):
        s = gated()
        s.model.float()
        build_trainer(s, MethodConfig(name="standard"), TrainingConfig(max_steps=1, bf16=False, fused_gelu=fused),
                      recs, [], None, tmp_path / str(fused))
        assert any(isinstance(m, GELUTanh) for m in s.model.modules()) is fused


def test_fuse_tasks_default_is_on_for_encoder_decoder_students_and_off_for_causal_ones():
    """Stacked in one pass, a causal student's label rows are padded to the rationale rows' width:
    slower and more memory than a pass per task (docs/performance.md); an encoder-decoder student
    shares one encoder pass. An explicit setting is kept either way."""
    for kind, want in (("t5", True), ("llama", False)):
        for setting, expected in ((None, want), (True, True), (False, False)):
            trainer = build_trainer(STUDENTS[kind](seed=0), SBS, TrainingConfig(bf16=False, fuse_tasks=setting),
                                    _records(), [], None, _tmp(), progress=False)
            assert trainer.fuse_tasks is expected, (kind, setting)


@pytest.mark.parametrize("bf16", [True, False])
def test_the_fused_output_layer_runs_in_the_forwards_precision(bf16, monkeypatch):
    """accelerate puts bf16 autocast around the student's forward only; the fused output layer
    runs after it, so training must give it the same autocast (it once ran in float32 there,
    with a 3x slower vocabulary projection)."""
    import stepdistill.training.trainer as tr

    seen = []

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return real(*args, **kwargs)

    real = tr.linear_cross_entropy
    monkeypatch.setattr(tr, "linear_cross_entropy", spy)
    cfg = TrainingConfig(max_steps=1, batch_size=4, bf16=bf16, group_by_length=False)
    trainer = build_trainer(t5_student(), SBS, cfg, _records(), [], None, _tmp(), progress=False)
    trainer.args.save_strategy = "no"
    trainer.train()
    assert seen and all(s == (torch.bfloat16 if bf16 else False) for s in seen)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_under_ddp_the_fused_output_layer_runs_inside_the_forward_with_the_same_loss_and_gradients(kind, monkeypatch,
                                                                                                  tmp_path):
    """Under DDP the fused layer and loss run in the wrapped forward, its losses the forward's
    logits. Run after the forward (as in one process), DDP with find_unused_parameters (transformers'
    default) marks the output layer's weight unused, then its gradient marks it ready twice: the step
    failed. Two steps, so a second step's bookkeeping is exercised too; world size 1 (gloo)."""
    import gc

    import torch.distributed as dist

    import stepdistill.training.trainer as tr

    calls = []
    real = tr.linear_cross_entropy
    monkeypatch.setattr(tr, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        results = []
        for wrap in (False, True):
            trainer = build_trainer(STUDENTS[kind](seed=0), SBS, TrainingConfig(bf16=False, group_by_length=False),
                                    _records(), [], None, _tmp(), progress=False)
            model = inner = trainer.model.train()
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
            if wrap:
                model = torch.nn.parallel.DistributedDataParallel(inner, find_unused_parameters=True)
            calls.clear()
            losses = []
            for _ in range(2):
                inner.zero_grad()
                loss = trainer.compute_loss(model, trainer.data_collator(trainer.train_dataset[:8]))
                loss.backward()
                losses.append(loss.item())
            assert calls  # the fused layer ran, wrapped or not
            results.append((losses, {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}))
            # the DDP wrapper (its Reducer holds the process group) goes before the group does: freed after
            # destroy_process_group, the group's destructor waited on its gloo thread for ever (seen in CI)
            del model, inner, trainer
            gc.collect()
    finally:
        dist.destroy_process_group()
    (one, one_grads), (ddp, ddp_grads) = results
    assert ddp == pytest.approx(one, rel=1e-5)
    assert ddp_grads.keys() == one_grads.keys()
    for k in one_grads:
        torch.testing.assert_close(ddp_grads[k], one_grads[k], atol=1e-6, rtol=1e-4, msg=k)
