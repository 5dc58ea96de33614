"""KasaCallback: a stock transformers Trainer (and trl's SFTTrainer) trains KaSA with its regularizer, in one call.

The bar (issue #16): after N optimizer steps the parameters equal those of a hand-written loop that adds
kasa_regularizer to the loss of every micro-batch with the task loss's scaling. Here N = 3 optimizer steps over 5
micro-batches with gradient accumulation 2 (windows of 2, 2 and 1: the epoch's last step accumulates one), under
bf16 autocast, with the Trainer's gradient clipping, fused AdamW and linear schedule. The equality is BITWISE
(torch.equal on every parameter): at each step the callback runs kasa_regularizer's backward once with the factor
S / n (S the GradScaler scale, n the micro-batches of the step) in fp32, the very factor and op the hand-written
loop's backward uses, and adds the result to each micro-batch's task gradient before accumulation, where autograd
adds it in the loop. The Trainer's scaling of the task loss comes in both modes: the token count across the
accumulated batch (num_items_in_batch, transformers' default for causal LMs) and the per-micro-batch mean divided
by n.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import KasaConfig, LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import kasa_kernels as kk  # noqa: E402
from kasa_kernels._layers import peft_kasa_layers  # noqa: E402
from kasa_kernels.integrations import peft as kk_peft  # noqa: E402
from kasa_kernels.integrations.transformers import KasaCallback  # noqa: E402
from helpers import assert_within_ref, randomize_kasa  # noqa: E402
from test_peft_integration import randomize_peft_adapters, tiny_llama  # noqa: E402

BETA, GAMMA = 0.05, 0.02  # large enough that the regularizer visibly moves the adapters in 3 steps
TARGETS = ["q_proj", "v_proj", "down_proj"]
GA, BATCH, SEQ, SAMPLES = 2, 2, 12, 10  # 5 micro-batches: optimizer steps of 2, 2 and 1


def make_model(kind):
    original = tiny_llama()
    if kind == "peft":
        model = get_peft_model(original, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                    kasa_config=KasaConfig(beta=BETA, gamma=GAMMA)))
        randomize_peft_adapters(model)
    else:
        model = kk.inject(original, TARGETS, r=4, alpha=8, backend="torch")
        randomize_kasa(model)
    return model


def dataset(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(SAMPLES):
        ids = torch.randint(0, 96, (SEQ,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class RecordingCollator:
    """Stacks samples into a batch and keeps every batch, in the order the Trainer used them."""

    def __init__(self):
        self.batches = []

    def __call__(self, samples):
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def training_args(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=GA,
              num_train_epochs=1, learning_rate=1e-2, bf16=True, use_cpu=True, report_to=[], save_strategy="no",
              logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    kw.update(overrides)
    return TrainingArguments(**kw)


def hand_written_loop(model, batches, args, loss_mode, scaler=None, beta=None, gamma=None):
    """N optimizer steps with `loss = task + kasa_regularizer(model)` per micro-batch, scaled as the task loss: the
    Trainer's optimizer, schedule and clipping, written out."""
    if peft_kasa_layers(model):
        kk_peft.patch_peft_model(model, backend="torch")  # the same fused forward as under the callback
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    opt = opt_cls([{"params": params, "weight_decay": 0.0}], **opt_kwargs)
    steps = math.ceil(len(batches) / GA)
    sched = transformers.get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=0, num_training_steps=steps)
    model.train()
    for step in range(steps):
        window = batches[step * GA:(step + 1) * GA]
        n = len(window)
        n_items = sum(b["labels"][..., 1:].ne(-100).sum() for b in window)
        for b in window:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if loss_mode == "tokens":
                    task = model(**b, num_items_in_batch=n_items).loss
                else:
                    task = model(**b).loss
            reg = kk.kasa_regularizer(model, beta=beta, gamma=gamma)
            loss = task + reg / n if loss_mode == "tokens" else (task + reg) / n
            (loss if scaler is None else scaler.scale(loss)).backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model


class FactorSpy(TrainerCallback):
    """Reads the regularizer's factor S / n after KasaCallback set it for each step."""

    def __init__(self, kasa_callback):
        self.kasa_callback = kasa_callback
        self.factors = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.factors.append(self.kasa_callback.factor.item())


def train_with_callback(model, tmp_path, loss_mode, scaler=None, callback=None, **arg_overrides):
    callback = callback or KasaCallback()
    spy = FactorSpy(callback)
    collate = RecordingCollator()
    args = training_args(tmp_path, **arg_overrides)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), data_collator=collate,
                      callbacks=[callback, spy])
    if loss_mode == "mean":
        trainer.model_accepts_loss_kwargs = False  # the Trainer then divides each micro-batch's mean loss by n
    if scaler is not None:
        # accelerate gives CPU no GradScaler (fp16 autocast needs a GPU there); a CPU GradScaler in its place runs
        # the same path accelerate takes on a GPU: scaler.scale(loss).backward(), scaler.step, scaler.update
        trainer.accelerator.scaler = scaler
    trainer.train()
    assert len(collate.batches) == SAMPLES // BATCH
    return trainer.model, collate.batches, args, spy.factors


def assert_same_parameters(got, want, initial, tag):
    """Every parameter of `got` bitwise equal to `want`'s, and every trainable one moved from `initial`."""
    got_params, init_params = dict(got.named_parameters()), dict(initial.named_parameters())
    trainable = 0
    for n, p in want.named_parameters():
        diff = (got_params[n].float() - p.float()).abs().max().item()
        assert torch.equal(got_params[n], p), f"{tag}: {n} differs by up to {diff:.3e}"
        if p.requires_grad:
            trainable += 1
            assert not torch.equal(p.cpu(), init_params[n].cpu()), f"{tag}: {n} did not move in training"
    assert trainable
    print(f"{tag}: all {trainable} trainable tensors bitwise equal after training")


@pytest.mark.parametrize("kind,loss_mode", [("peft", "tokens"), ("peft", "mean"), ("kk", "tokens")])
def test_trainer_with_callback_equals_hand_written_loop(kind, loss_mode, tmp_path):
    model = make_model(kind)
    initial, hand = copy.deepcopy(model), copy.deepcopy(model)
    beta_gamma = {} if kind == "peft" else {"beta": BETA, "gamma": GAMMA}  # PEFT: each adapter's KasaConfig
    trained, batches, args, factors = train_with_callback(model, tmp_path, loss_mode,
                                                          callback=KasaCallback(**beta_gamma))
    assert factors == [0.5, 0.5, 1.0]  # 1/n for steps of 2, 2 and 1 micro-batches
    hand_written_loop(hand, batches, args, loss_mode, **beta_gamma)
    assert_same_parameters(trained, hand, initial, f"{kind}/{loss_mode}")
    # the callback undid itself: PEFT's forward again, no hook left
    assert kk_peft.fused_layer_names(trained) == []
    assert all(not p._backward_hooks for p in trained.parameters())


def test_trainer_with_callback_and_a_grad_scaler_equals_hand_written_loop(tmp_path):
    def scaler():
        # growth every step: the callback must read the scale anew each step (2^10, 2^11, 2^12)
        return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)

    model = make_model("peft")
    initial, hand = copy.deepcopy(model), copy.deepcopy(model)
    trained, batches, args, factors = train_with_callback(model, tmp_path, "tokens", scaler=scaler(),
                                                          max_grad_norm=0.0)
    assert factors == [2.0**10 / 2, 2.0**11 / 2, 2.0**12]
    hand_written_loop(hand, batches, args, "tokens", scaler=scaler())
    assert_same_parameters(trained, hand, initial, "peft/scaler")


def test_without_the_callback_the_trainer_misses_the_regularizer(tmp_path):
    """The premise: a stock Trainer on a PEFT KaSA model trains without the regularizer."""
    model = make_model("peft")
    hand = copy.deepcopy(model)
    collate = RecordingCollator()
    args = training_args(tmp_path, max_steps=1)
    Trainer(model=model, args=args, train_dataset=dataset(), data_collator=collate).train()
    hand_written_loop(hand, collate.batches[:GA], args, "tokens")
    differ = [n for (n, p), (_, q) in zip(model.named_parameters(), hand.named_parameters())
              if p.requires_grad and not torch.allclose(p, q, rtol=0, atol=1e-6)]
    assert differ, "one optimizer step with and without the regularizer gave the same adapters"


def test_one_step_gradient_matches_peft_and_its_kasa_loss(tmp_path):
    """Against PEFT itself: the gradient the callback's Trainer step hands the optimizer equals that of PEFT's own
    forward plus LoraModel._get_kasa_loss() (fp64 reference, tests/helpers.py's whole-model rule), in fp32."""
    model = make_model("peft")
    peft_model = copy.deepcopy(model)

    class GradCapture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    capture = GradCapture()
    collate = RecordingCollator()
    args = training_args(tmp_path, max_steps=1, bf16=False, max_grad_norm=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), data_collator=collate,
                      callbacks=[KasaCallback(), capture])
    trainer.train()
    batches = collate.batches[:GA]
    n_items = sum(b["labels"][..., 1:].ne(-100).sum() for b in batches)

    def peft_grads(m):
        m.train()
        m.zero_grad()
        for b in batches:  # PEFT's documented recipe: task loss + _get_kasa_loss(), as the Trainer scales the task
            task = m(**b, num_items_in_batch=n_items).loss
            (task + m.base_model._get_kasa_loss() / len(batches)).backward()
        return {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    want32 = peft_grads(peft_model)
    want64 = peft_grads(copy.deepcopy(peft_model).double())
    assert sorted(want32) == sorted(capture.grads)
    for n, g in capture.grads.items():
        assert_within_ref(n.removeprefix("base_model.model.model."), g, want64[n], want32[n], torch.float32)


def test_several_active_adapters_train_with_their_own_configs(tmp_path):
    """Two active adapters on q_proj / v_proj (fused as one layer of rank 4 + 2), each regularized with its own
    KasaConfig: bitwise the hand-written loop."""
    model = make_model("peft")
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"],
                                          kasa_config=KasaConfig(beta=0.3, gamma=0.1)))
    randomize_peft_adapters(model, seed=9)
    model.base_model.set_adapter(["default", "other"])
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    initial, hand = copy.deepcopy(model), copy.deepcopy(model)
    trained, batches, args, _ = train_with_callback(model, tmp_path, "tokens")
    hand_written_loop(hand, batches, args, "tokens")
    assert_same_parameters(trained, hand, initial, "two adapters")


def test_callback_refuses_what_it_cannot_train(tmp_path):
    with pytest.raises(TypeError, match="beta: expected None or a finite float"):
        KasaCallback(beta="1e-4")
    with pytest.raises(ValueError, match="form: expected one of"):
        KasaCallback(form="squared")
    with pytest.raises(ValueError, match="backend: expected one of"):
        KasaCallback(backend="nope")
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=1), train_dataset=dataset(),
                      data_collator=RecordingCollator(), callbacks=[KasaCallback()])
    with pytest.raises(ValueError, match="found no KaSA layers"):
        trainer.train()
    model = make_model("peft")
    for p in model.parameters():
        p.requires_grad_(False)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=dataset(),
                      data_collator=RecordingCollator(), callbacks=[KasaCallback()])
    with pytest.raises(ValueError, match="no KaSA adapter parameter requires grad"):
        trainer.train()
    assert kk_peft.fused_layer_names(model) == []  # the refusal left the model as it was


def test_micro_batch_count_follows_the_trainers_windows():
    """The accumulation windows the callback predicts, and its check that the Trainer ran as many micro-batches."""
    from types import SimpleNamespace

    cb = KasaCallback()
    args = SimpleNamespace(gradient_accumulation_steps=4)
    for steps_in_epoch, windows in ((8, [4, 4]), (9, [4, 4, 1]), (3, [3]), (4, [4])):
        cb._steps_in_epoch = steps_in_epoch
        per_epoch = len(windows)
        for epoch in range(2):  # the windows repeat every epoch
            got = [cb._micro_batches(args, SimpleNamespace(global_step=epoch * per_epoch + u, max_steps=99))
                   for u in range(per_epoch)]
            assert got == windows, (steps_in_epoch, got)
    cb._steps_in_epoch = None  # no dataloader length: the Trainer runs max_steps full windows
    assert cb._micro_batches(args, SimpleNamespace(global_step=5, max_steps=7)) == 4
    cb.model, cb._expected, cb._seen = object(), 2, 0
    cb.on_substep_end(args, None, None)
    cb.on_step_end(args, None, None)  # 2 seen, 2 expected
    cb._seen = 0
    with pytest.raises(RuntimeError, match="accumulated 1 micro-batches where the Trainer's windowing predicted 2"):
        cb.on_step_end(args, None, None)


def test_sft_trainer_with_callback_equals_adding_the_regularizer_by_hand(tmp_path):
    """trl's SFTTrainer computes its loss itself (from the model's fused log-probs), never reading the model's loss:
    the folded regularizer still lands exactly where `loss + kasa_regularizer(model) / n` in compute_loss puts it."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t0")),
        pad_token="t0", eos_token="t1")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(6, 14, (SAMPLES,), generator=g).tolist()  # unequal: padding and token counts matter
    rows = [torch.randint(2, 96, (n,), generator=g).tolist() for n in lengths]
    data = datasets.Dataset.from_dict({"input_ids": rows})

    class HandRegularizedSFT(trl.SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            reg = kk.kasa_regularizer(model)
            # with num_items_in_batch the task loss is already scaled for accumulation: divide the regularizer too
            return loss + (reg / self.current_gradient_accumulation_steps if num_items_in_batch is not None else reg)

    def sft_args(out):
        return trl.SFTConfig(output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=GA,
                             num_train_epochs=1, learning_rate=1e-2, bf16=True, use_cpu=True, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                             dataloader_num_workers=0, max_length=None)

    model = make_model("peft")
    initial, hand = copy.deepcopy(model), copy.deepcopy(model)
    trl.SFTTrainer(model=model, args=sft_args(tmp_path / "cb"), train_dataset=data, processing_class=tok,
                   callbacks=[KasaCallback()]).train()
    kk_peft.patch_peft_model(hand, backend="torch")
    HandRegularizedSFT(model=hand, args=sft_args(tmp_path / "hand"), train_dataset=data, processing_class=tok).train()
    assert_same_parameters(model, hand, initial, "sft")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trainer_fp16_grad_scaler_on_gpu_equals_hand_written_loop(tmp_path):
    """accelerate's own GradScaler (fp16 autocast on CUDA), with clipping after unscale_, as a Trainer runs it. The
    torch backend on both sides: the fused backends' default fp32 atomics may vary the last bits between runs
    (docs/determinism.md), which a bitwise comparison would mistake for a difference."""
    model = make_model("peft").cuda()
    initial, hand = copy.deepcopy(model), copy.deepcopy(model)
    callback = KasaCallback(backend="torch")
    spy = FactorSpy(callback)
    collate = RecordingCollator()
    args = training_args(tmp_path, bf16=False, fp16=True, use_cpu=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), data_collator=collate,
                      callbacks=[callback, spy])
    trainer.train()
    scaler = torch.amp.GradScaler("cuda")
    assert spy.factors[0] == scaler.get_scale() / GA
    kk_peft.patch_peft_model(hand, backend="torch")
    opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, hand)
    params = [p for p in hand.parameters() if p.requires_grad]
    opt = opt_cls([{"params": params, "weight_decay": 0.0}], **opt_kwargs)
    steps = math.ceil(len(collate.batches) / GA)
    sched = transformers.get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=0, num_training_steps=steps)
    hand.train()
    for step in range(steps):
        window = [{k: v.cuda() for k, v in b.items()} for b in collate.batches[step * GA:(step + 1) * GA]]
        n_items = sum(b["labels"][..., 1:].ne(-100).sum() for b in window)
        for b in window:
            with torch.autocast("cuda", dtype=torch.float16):
                task = hand(**b, num_items_in_batch=n_items).loss
            scaler.scale(task.float() + kk.kasa_regularizer(hand) / len(window)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(hand.parameters(), args.max_grad_norm)
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() >= scale_before:  # the Trainer steps the schedule only when the step was taken
            sched.step()
        opt.zero_grad(set_to_none=True)
    assert_same_parameters(model, hand, initial, "gpu")


@pytest.mark.parametrize("ds", [{"deepspeed": "ds_config.json"}, {"deepspeed": None, "deepspeed_plugin": object()}],
                         ids=["training-args", "accelerate-plugin"])
def test_deepspeed_is_refused_however_it_is_configured(ds):
    # accelerate's DeepSpeed (ACCELERATE_USE_DEEPSPEED) sets only TrainingArguments.deepspeed_plugin
    import types

    from kasa_kernels.integrations.transformers import KasaCallback

    with pytest.raises(ValueError, match="DeepSpeed"):
        KasaCallback().on_train_begin(types.SimpleNamespace(**ds), None, None, model=torch.nn.Linear(4, 4))
