"""The task seam in process: classify builds what it always built; the LM loss, metrics,
optimizer groups, schedule and gradient clipping against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import REPO
from torch import nn

from localsgd.config import ConfigError
from localsgd.data import build_datasets
from localsgd.engines.deepspeed_config import resolve_deepspeed_config
from localsgd.engines.precision import Autocast
from localsgd.models import build_model
from localsgd.recipe import facts, load_config
from localsgd.tasks import TASKS, build_task
from localsgd.tasks.base import cross_entropy_metrics
from localsgd.tasks.lm import TokenCrossEntropy, cache_dir, spread
from localsgd.train.evaluate import evaluate
from localsgd.train.optim import LRCurve, build_optimizer

TINY = REPO / "recipes/tests/tiny_synthetic.yaml"
LM = REPO / "recipes/shakespeare/gpt_tiny_minibatch.yaml"
ZERO0 = REPO / "deepspeed_configs/zero0_fp32.json"


def test_tasks_are_found_by_name() -> None:
    assert TASKS.names() == ["classify", "lm"]


def test_classify_builds_the_datasets_and_model_it_always_built() -> None:
    cfg = load_config(TINY)
    task = build_task(cfg)
    data, direct = task.datasets(allow_download=False), build_datasets(cfg.data, cfg.seed)
    assert (len(data.train), len(data.test), data.num_classes) == (
        len(direct.train), len(direct.test), direct.num_classes)
    assert torch.equal(data.train[5][0], direct.train[5][0])
    torch.manual_seed(3)
    mine = task.model(data)
    torch.manual_seed(3)
    theirs = build_model(cfg.model, direct.num_classes, direct.image_size)
    for (k, a), (k2, b) in zip(mine.state_dict().items(), theirs.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b)
    assert type(task.loss_fn()) is nn.CrossEntropyLoss
    assert task.metrics("eval", 6.0, 3.0, 4.0) == {"eval/loss": 1.5, "eval/acc": 0.75}


def test_each_task_names_its_own_axes_and_rates() -> None:
    """Samples for every task; the LM adds tokens (context per window) beside them."""
    image, lm = build_task(load_config(TINY)), build_task(load_config(LM, ["data.context=16"]))
    assert image.progress(40) == {"samples": 40}
    assert image.throughput(40, 8.0) == {"throughput/samples_per_s": 5.0}
    assert lm.progress(40) == {"samples": 40, "tokens": 640}
    assert lm.throughput(640, 8.0) == {"throughput/samples_per_s": 5.0,
                                       "throughput/tokens_per_s": 80.0}


def test_token_cross_entropy_equals_an_independent_one() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 7, (3, 5), generator=gen)
    z = logits.numpy()
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -np.mean([logp[b, t, y[b, t]] for b in range(3) for t in range(5)])
    assert float(TokenCrossEntropy()(logits, y)) == pytest.approx(expected, rel=1e-12)


def test_lm_metrics_follow_from_the_sums() -> None:
    m = cross_entropy_metrics("eval", loss_sum=1000.0, correct=250.0, count=500.0)
    assert m["eval/loss"] == 2.0
    assert m["eval/bpb"] == pytest.approx(2.0 / math.log(2), rel=1e-15)
    assert m["eval/ppl"] == pytest.approx(math.exp(2.0), rel=1e-15)
    assert m["eval/acc"] == 0.5


class _Bag(nn.Module):
    """Logits for every position from a token embedding (an LM's shape, no GPT needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 11)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(idx)))


def test_evaluate_sums_every_position_of_token_windows() -> None:
    torch.manual_seed(0)
    model = _Bag().double()
    x = torch.randint(0, 11, (6, 9))
    y = torch.randint(0, 11, (6, 9))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    totals = evaluate(model, loader, torch.device("cpu"), torch.float64).tolist()
    with torch.no_grad():
        logits = model(x)
    logp = torch.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    assert totals[0] == pytest.approx(float(-logp.sum()), rel=1e-12)
    assert totals[1] == float((logits.argmax(-1) == y).sum())
    assert totals[2] == 54


def test_no_weight_decay_on_norms_embeddings_and_biases() -> None:
    cfg = load_config(LM)
    model = _Bag()
    groups = build_optimizer(cfg.optim, model, 1e-3).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model.head.weight)}
    assert groups[0]["weight_decay"] == cfg.optim.weight_decay == 0.1


def test_warmup_in_steps_then_cosine_to_a_floor() -> None:
    cfg = load_config(LM, ["train.max_steps=100", "lr_schedule.warmup_steps=10",
                           "lr_schedule.warmup_start=0.01", "lr_schedule.min_lr_ratio=0.1"])
    peak = cfg.optim.base_lr
    curve = LRCurve(cfg.lr_schedule, cfg.optim.base_lr, peak, steps_per_epoch=1000, epochs=1)
    for step in range(0, 101):
        if step <= 10:
            want = peak * (0.01 + (1 - 0.01) * step / 10)
        else:
            frac = (step - 10) / 90
            want = peak * (0.1 + 0.9 * (1 + math.cos(math.pi * frac)) / 2)
        assert curve(step) == pytest.approx(want, rel=1e-9), step


def test_clipping_scales_the_gradient_to_the_global_norm() -> None:
    torch.manual_seed(0)
    model = _Bag()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.randint(0, 11, (4, 5))).pow(2).sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in before.values()))
    assert norm > 0.5
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    Autocast("fp32", torch.device("cpu")).step(opt, clip=0.5)
    for n, p in model.named_parameters():  # SGD lr 1: the step is minus the clipped gradient
        torch.testing.assert_close(weights[n] - p.detach(), before[n] * 0.5 / (norm + 1e-6))


def test_deepspeed_takes_the_clip_from_the_recipe_and_refuses_it_on_local_steps() -> None:
    ds = ["engine.name=deepspeed", f"engine.deepspeed_config={ZERO0}"]
    cfg = load_config(LM, ds)
    assert resolve_deepspeed_config(str(ZERO0), facts(cfg, 2, 2))["gradient_clipping"] == 1.0
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "recipes/shakespeare/gpt_tiny_diloco.yaml", ds)
    assert any(p.startswith("optim.grad_clip: DeepSpeed") for p in info.value.problems)


def test_task_rules_name_the_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(LM, ["data.name=cifar10", "model.name=resnet20", "data.context=1",
                         "data.val_fraction=1.5", "model.dropout=1", "train.target_acc=0.5"])
    keys = sorted(p.split(":")[0] for p in info.value.problems)
    assert keys == ["data.context", "data.name", "data.val_fraction", "model.dropout",
                    "model.name", "train.target_acc"]
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["data.name=text"])
    assert [p.split(":")[0] for p in info.value.problems] == ["data.name"]


def test_cache_folder_default_and_never_inside_the_data(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setenv("LOCALSGD_CACHE", str(tmp_path / "c"))
    assert cache_dir(None) == tmp_path / "c"
    assert cache_dir("/x/y") == cache_dir("/x/y/")
    with pytest.raises(ConfigError) as info:
        load_config(LM, [f"data.root={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"])
    assert [p.split(":")[0] for p in info.value.problems] == ["data.cache_dir"]


def test_validation_subset_is_spread_over_every_document() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(10))
    assert [int(x) for (x,) in spread(data, 4)] == [0, 2, 5, 7]
    assert spread(data, 10) is data and spread(data, None) is data
