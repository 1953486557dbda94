"""RobustTrainer: the same events as MONAI's SupervisedTrainer, the method's loss, MONAI handlers keep working."""

from __future__ import annotations

import copy

import mlflow
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointSaver, MLFlowHandler, StatsHandler, ValidationHandler

from pipeline.adversarial.methods import build_method
from pipeline.adversarial.tasks import Classification
from pipeline.config import method_config
from pipeline.engine.trainer import RobustTrainer


def toy_items(n: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        label = i % 2
        image = torch.rand(1, 8, 8, generator=g) * 0.5 + 0.5 * label
        items.append({"image": image, "label": label, "index": i})
    return items


def toy_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))


def loader(items, batch_size=4, shuffle=False):
    return DataLoader(Dataset(items), batch_size=batch_size, shuffle=shuffle)


def record_events(engine) -> list[str]:
    seen: list[str] = []
    for event in [Events.STARTED, Events.EPOCH_STARTED, Events.ITERATION_STARTED, Events.GET_BATCH_STARTED,
                  Events.GET_BATCH_COMPLETED, *IterationEvents, Events.ITERATION_COMPLETED,
                  Events.EPOCH_COMPLETED, Events.COMPLETED]:
        engine.add_event_handler(event, lambda e, name=event.name: seen.append(name))
    return seen


def test_event_order_equals_base_trainer():
    items = toy_items()
    net_a, net_b = toy_net(), toy_net()
    base = SupervisedTrainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=loader(items),
                             network=net_a, optimizer=torch.optim.SGD(net_a.parameters(), lr=0.1),
                             loss_function=torch.nn.CrossEntropyLoss(), decollate=False)
    method = build_method(method_config(name="standard"), Classification(), len(items))
    ours = RobustTrainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=loader(items), network=net_b,
                         optimizer=torch.optim.SGD(net_b.parameters(), lr=0.1), method=method, decollate=False)
    seen_base, seen_ours = record_events(base), record_events(ours)
    base.run()
    ours.run()
    assert seen_ours == seen_base
    assert seen_ours.count("MODEL_COMPLETED") == 2 * 3  # 12 samples / batch 4, two epochs
    # the standard method through our trainer takes exactly the base trainer's steps
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_one_step_matches_hand_computed_sgd_update():
    items = toy_items(4)
    net = toy_net(1)
    before = copy.deepcopy(net)
    method = build_method(method_config(name="standard"), Classification(), len(items))
    trainer = RobustTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=loader(items), network=net,
                            optimizer=torch.optim.SGD(net.parameters(), lr=0.5), method=method, decollate=False)
    trainer.run()
    x = torch.stack([it["image"] for it in items])
    y = torch.tensor([it["label"] for it in items])
    loss = torch.nn.functional.cross_entropy(before(x), y)
    grads = torch.autograd.grad(loss, list(before.parameters()))
    for p_new, p_old, g in zip(net.parameters(), before.parameters(), grads):
        torch.testing.assert_close(p_new, p_old - 0.5 * g)
    assert trainer.state.output["loss"].item() == pytest.approx(loss.item(), rel=1e-5)


def test_pgd_at_output_carries_adversarial_inputs_inside_the_ball():
    items = toy_items(8)
    net = toy_net(2)
    cfg = method_config(name="pgd_at", eps=0.3, steps=3, norm="L2")
    method = build_method(cfg, Classification(), len(items))
    trainer = RobustTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=loader(items), network=net,
                            optimizer=torch.optim.SGD(net.parameters(), lr=0.1), method=method, decollate=False)
    trainer.run()
    out = trainer.state.output
    delta = (out["adv"] - out["image"]).flatten(1).norm(dim=1)
    assert out["adv"].shape == out["image"].shape == (4, 1, 8, 8)
    assert bool((delta <= 0.3 + 1e-5).all()) and float(delta.max()) > 0.1


def test_monai_handlers_work_with_the_robust_trainer(tmp_path, mlflow_uri):
    items, val_items = toy_items(12), toy_items(6, seed=1)
    net = toy_net(3)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader(val_items), network=net,
                                    decollate=False)
    method = build_method(method_config(name="ima", steps=3, eps_max=1.0, delta=0.1), Classification(), len(items))
    trainer = RobustTrainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=loader(items, shuffle=True),
                            network=net, optimizer=opt, method=method, decollate=False,
                            train_handlers=[StatsHandler(tag_name="loss", output_transform=lambda out: out["loss"].item()),
                                            ValidationHandler(validator=evaluator, interval=1),
                                            CheckpointSaver(save_dir=str(tmp_path / "ckpt"), save_dict={"net": net},
                                                            save_interval=1, n_saved=2),
                                            MLFlowHandler(tracking_uri=mlflow_uri, experiment_name="handlers",
                                                          output_transform=lambda out: out["loss"].item(),
                                                          close_on_complete=True)])
    trainer.run()
    assert evaluator.state.epoch == 2
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["net_epoch=1.pt", "net_epoch=2.pt"]
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("handlers")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "Loss")
    assert len(history) == 6  # one value per iteration: 3 iterations x 2 epochs
    assert runs[0].data.params["max_epochs"] == "2"
