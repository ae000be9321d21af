"""The baselines, each held to what its paper says, through the real app on an in-memory Grid.

Each federated baseline is also computed from its definition in one process (``reference``):
who trains on what, what the server averages and what stays on the clients; the messages must
reproduce it, and must never carry what a method keeps on the clients.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import Array, Message
from torch import nn

from client.app import app as client_app
from common.experiment import task
from common.experiment.config import CHOICES, RunConfig
from common.experiment.methods import BN_STATS, METHODS, local_keys, train_local
from common.fedtan.aggregation import average_states
from common.protocol import (
    CONFIG_RECORD,
    EVALUATE_LOCAL,
    FREEZE_BN_STATS,
    MODEL_RECORD,
    OWN_STATE,
    SERVER_ROUND,
    TRAIN_LOCAL,
)
from server.local_run import LocalGrid, run_locally
from tests.float_noise import assert_within_rounding_noise
from tests.test_flower_app import assert_is_the_in_process_model

K = 3
BASE = {
    "dataset": "digits",
    "model": "small_cnn",
    "partition": "sorted",  # non-IID: each client sees 3-4 of the 10 digits
    "num-clients": K,
    "batch-size": 12,
    "num-rounds": 2,
    "local-steps": 2,
    "lr": 0.1,
    "momentum": 0.9,
    "weight-decay": 1e-4,
    "max-retries": 1,
}


def run(tmp_path, method, faults=None, **overrides):
    run_config = {**BASE, "method": method, "output-dir": str(tmp_path / method), **overrides}
    return run_locally(client_app, run_config, faults=faults, num_nodes=K)


def reference(
    cfg: RunConfig, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The method by its definition, in one process: the global state, each client's own."""
    method = METHODS[cfg.method]
    model = task.build_global_model(cfg).to(dtype)
    own_keys = local_keys(model, method)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    own = [{k: global_state[k].clone() for k in own_keys} for _ in range(K)]
    for r in range(1, cfg.num_rounds + 1):
        states, weights = [], []
        for k in range(K):
            client = task.build_global_model(cfg).to(dtype)
            client.load_state_dict({**global_state, **own[k]})
            batches = [
                (x.to(dtype), y)
                for x, y in task.client_batches(
                    cfg, k, K, r, batch_size=cfg.batch_size, local_steps=cfg.local_steps
                )
            ]
            train_local(
                client,
                batches,
                task.loss_fn,
                lr=cfg.lr_at(r),
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
                freeze_bn_stats=method.freeze_bn_stats and r > cfg.fixbn_switch,
            )
            state = client.state_dict()
            own[k] = {key: state[key] for key in own_keys}
            states.append({key: v for key, v in state.items() if key not in own_keys})
            weights.append(sum(len(y) for _, y in batches))
        global_state.update(average_states(states, weights))
    return global_state, own


def assert_is_the_definition(actual, cfg, keys=None, own_of=None, references=None):
    """``actual`` is the method's reference state (the global one, or client ``own_of``'s own
    entries), to float32's own noise: no farther from the float64 reference than the float32
    reference is. ``references``: the float32 and float64 ``reference(cfg)``, if at hand."""
    plain32, exact64 = references or (reference(cfg, t) for t in (torch.float32, torch.float64))
    if own_of is None:
        plain32, exact64 = plain32[0], exact64[0]
    else:
        plain32, exact64 = plain32[1][own_of], exact64[1][own_of]
    keys = list(plain32) if keys is None else keys
    start = task.build_global_model(cfg).state_dict()
    states = (actual, plain32, exact64, start)
    assert_within_rounding_noise(*({k: state[k] for k in keys} for state in states))


def is_bn_key(key: str) -> bool:
    return key.split(".")[0].startswith("bn")  # small_cnn: bn1, bn2 (2d), bn3 (1d)


def sent_and_replied(grid: LocalGrid, replies: list[Message], message_type: str):
    down = [m for m in grid.sent if m.metadata.message_type == message_type]
    up = [m for m in replies if m.metadata.message_type == message_type]
    return down, up


def own_state(grid: LocalGrid, k: int) -> dict[str, torch.Tensor]:
    return grid.contexts[1000 + k].state.array_records[OWN_STATE].to_torch_state_dict()


def recording(replies: list[Message]):
    def fault(reply: Message) -> Message:
        replies.append(reply)
        return reply

    return {1000 + k: fault for k in range(K)}


def test_every_configurable_method_is_in_the_method_table():
    assert set(CHOICES["method"]) == set(METHODS)


# --- FedAvg with BN, FedBN, SiloBN, FixBN: the messages give the methods' definitions -------


@pytest.mark.parametrize("method", ["fedavg-bn", "fedbn", "silobn", "fixbn"])
def test_messages_give_the_method_computed_from_its_definition(tmp_path, method):
    overrides = {"num-rounds": 3, "fixbn-switch-round": 1}
    result, grid = run(tmp_path, method, **overrides)
    cfg = RunConfig.from_flower({**BASE, "method": method, **overrides})
    references = reference(cfg), reference(cfg, torch.float64)
    global_state, own = references[0]
    got = result.arrays.to_torch_state_dict()
    assert list(got) == list(global_state)
    shared = [k for k in global_state if k not in own[0]]
    assert_is_the_definition(got, cfg, shared, references=references)
    for k in range(K):  # what each client keeps is its own training's, never the server's
        if own[k]:
            assert_is_the_definition(own_state(grid, k), cfg, own_of=k, references=references)
        else:
            assert OWN_STATE not in grid.contexts[1000 + k].state.array_records


def test_fedbn_never_sends_bn_layers_and_never_overwrites_them(tmp_path):
    replies: list[Message] = []
    result, grid = run(tmp_path, "fedbn", faults=recording(replies))
    down, up = sent_and_replied(grid, replies, TRAIN_LOCAL)
    assert len(down) == len(up) == K * 2
    for msg in down + up:
        keys = set(msg.content.array_records[MODEL_RECORD])
        assert not any(is_bn_key(k) for k in keys), sorted(keys)
        assert any(k.startswith("conv1") for k in keys)
    # The clients' BN layers (affine and statistics) differ: each kept its own.
    own = [own_state(grid, k) for k in range(K)]
    assert set(own[0]) == {k for k in result.arrays if is_bn_key(k)}
    for key in ("bn1.weight", "bn1.running_mean", "bn3.bias", "bn3.running_var"):
        assert not torch.allclose(own[0][key], own[1][key]), key


def test_a_client_is_refused_bn_entries_and_a_reply_with_them_is_named(tmp_path, caplog):
    def leaks_its_bn(reply: Message) -> Message:
        if reply.metadata.message_type == TRAIN_LOCAL and not reply.has_error():
            reply.content.array_records[MODEL_RECORD]["bn1.weight"] = Array(torch.ones(16).numpy())
        return reply

    result, grid = run(tmp_path, "fedbn", faults={1001: leaks_its_bn})
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert any("1001" in f and "bn1.weight" in f for f in failures), failures
    assert all(m["clients"] == 2 for m in result.train_metrics_clientapp.values())
    # ... and a client refuses a model that would overwrite its own BN layers.
    msg = next(m for m in grid.sent if m.metadata.message_type == TRAIN_LOCAL)
    msg.content.array_records[MODEL_RECORD]["bn1.weight"] = Array(torch.ones(16).numpy())
    with pytest.raises(ValueError, match="this client's own.*bn1.weight"):
        client_app(msg, grid.contexts[msg.metadata.dst_node_id])


def test_silobn_shares_the_bn_affine_parameters_but_not_the_statistics(tmp_path):
    replies: list[Message] = []
    _, grid = run(tmp_path, "silobn", faults=recording(replies))
    down, up = sent_and_replied(grid, replies, TRAIN_LOCAL)
    for msg in down + up:
        keys = set(msg.content.array_records[MODEL_RECORD])
        assert {"bn1.weight", "bn1.bias", "bn3.weight", "bn3.bias"} <= keys
        assert not any(k.endswith(BN_STATS) for k in keys), sorted(keys)
    own = [own_state(grid, k) for k in range(K)]
    assert all(k.endswith(BN_STATS) for k in own[0]) and "bn2.running_var" in own[0]
    assert not torch.allclose(own[0]["bn2.running_mean"], own[1]["bn2.running_mean"])


@pytest.mark.parametrize("method", ["fedbn", "silobn"])
def test_without_one_global_model_each_client_evaluates_its_own(tmp_path, method):
    result, grid = run(tmp_path, method)
    cfg = RunConfig.from_flower({**BASE, "method": method})
    global_state, own = reference(cfg)
    accuracies = []
    for k in range(K):
        model = task.build_global_model(cfg)
        model.load_state_dict({**global_state, **own[k]})
        accuracies.append(task.evaluate(model, cfg)["test-accuracy"])
    metrics = result.evaluate_metrics_clientapp[2]
    assert metrics["test-accuracy"] == pytest.approx(sum(accuracies) / K, abs=1e-9)
    assert metrics["test-accuracy-min"] == pytest.approx(min(accuracies), abs=1e-9)
    assert metrics["eval-clients"] == K
    evaluations = [m for m in grid.sent if m.metadata.message_type == EVALUATE_LOCAL]
    assert len(evaluations) == K * 3  # rounds 0, 1, 2
    for msg in evaluations:
        assert not set(msg.content.array_records[MODEL_RECORD]) & set(own[0])


def test_fixbn_statistics_stop_changing_after_the_switch_round(tmp_path):
    result, grid = run(tmp_path, "fixbn", **{"num-rounds": 4, "fixbn-switch-round": 2})
    train = [m for m in grid.sent if m.metadata.message_type == TRAIN_LOCAL]
    first = _by_round(train)  # round -> its first message, with the model it starts from
    frozen = {r: m.content.config_records[CONFIG_RECORD][FREEZE_BN_STATS] for r, m in first.items()}
    assert frozen == {1: False, 2: False, 3: True, 4: True}
    states = [
        first[r].content.array_records[MODEL_RECORD].to_torch_state_dict() for r in (1, 2, 3, 4)
    ]
    states.append(result.arrays.to_torch_state_dict())  # after round r: states[r]
    stats = [k for k in states[0] if k.endswith(BN_STATS)]
    assert not torch.equal(states[1]["bn1.running_mean"], states[2]["bn1.running_mean"])
    for r in (3, 4):
        for key in stats:
            assert torch.equal(states[r][key], states[2][key]), (r, key)
        assert not torch.equal(states[r]["bn1.weight"], states[r - 1]["bn1.weight"])


def _by_round(messages):
    seen = {}
    for m in messages:
        seen.setdefault(int(m.content.config_records[CONFIG_RECORD][SERVER_ROUND]), m)
    return seen


def test_frozen_statistics_normalize_with_the_running_ones_while_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model.eval()(x), y))
    (loss,) = train_local(model, [(x, y)], nn.CrossEntropyLoss(), lr=0.1, freeze_bn_stats=True)
    assert loss == pytest.approx(expected, rel=1e-6)
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(model.state_dict()[key], before[key]), key
    assert not torch.equal(model.state_dict()["1.weight"], before["1.weight"])


# --- FedAvg with GroupNorm, centralized, FedTAN -----------------------------------------------


def test_fedavg_gn_models_contain_no_batchnorm(tmp_path):
    result, _ = run(tmp_path, "fedavg-gn", norm="group")
    cfg = RunConfig.from_flower({**BASE, "method": "fedavg-gn", "norm": "group"})
    model = task.build_global_model(cfg)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(k.endswith(BN_STATS) for k in result.arrays)
    assert_is_the_definition(result.arrays.to_torch_state_dict(), cfg)


def test_centralized_with_one_step_equals_fedtan_with_one_step(tmp_path):
    overrides = {"local-steps": 1, "lr-milestones": "2"}
    central, grid = run(tmp_path, "centralized", **overrides)
    fedtan, _ = run(tmp_path, "fedtan", **overrides)
    assert grid.sent == []  # the server trained alone
    # Both are the in-process FedTAN engine's model (with E = 1, centralized SGD exactly).
    cfg = RunConfig.from_flower({**BASE, **overrides})
    for result in (central, fedtan):
        assert_is_the_in_process_model(result.arrays.to_torch_state_dict(), cfg, K)
    for r in (1, 2):
        assert central.train_metrics_clientapp[r]["train-loss"] == pytest.approx(
            fedtan.train_metrics_clientapp[r]["train-loss"], rel=1e-5
        )


def test_fedavg_bn_differs_from_fedtan_on_non_iid_data(tmp_path):
    overrides = {"local-steps": 1, "num-rounds": 1}
    fedavg, _ = run(tmp_path, "fedavg-bn", **overrides)
    fedtan, _ = run(tmp_path, "fedtan", **overrides)
    a, b = fedavg.arrays.to_torch_state_dict(), fedtan.arrays.to_torch_state_dict()
    # Local BN statistics of 3-4 classes vs. the union's: different normalization, different
    # gradients, different running statistics, from the very first step.
    for key in ("conv1.weight", "fc2.weight", "bn3.running_var"):
        assert (a[key] - b[key]).abs().max() > 1e-3, key


# --- schema and config ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["centralized", "fedavg-bn", "fedbn"])
def test_every_method_writes_the_same_metrics_columns(tmp_path, method):
    from server.results import COLUMNS

    run(tmp_path, method, **{"num-rounds": 1})
    header = (tmp_path / method / "metrics.csv").read_text().splitlines()[0].split(",")
    assert tuple(header[: len(COLUMNS)]) == COLUMNS
    assert '"status": "completed"' in (tmp_path / method / "summary.json").read_text()


def test_the_model_bytes_are_the_shared_entries_down_and_up(tmp_path):
    result, _ = run(tmp_path, "fedbn", **{"num-rounds": 1})
    rows = (tmp_path / "fedbn" / "metrics.csv").read_text().splitlines()
    row = dict(zip(rows[0].split(","), rows[1].split(","), strict=True))
    shared = sum(
        v.numel() * v.element_size()
        for k, v in result.arrays.to_torch_state_dict().items()
        if not is_bn_key(k)
    )
    assert int(row["model_bytes"]) == 2 * K * shared
    assert int(row["round_trips"]) == 1 and int(row["bn_bytes_up"]) == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"method": "fedavg-gn"}, "'fedavg-gn' needs 'norm' = 'group'"),
        ({"method": "fedbn", "norm": "group"}, "'fedbn' needs 'norm' = 'batch'"),
        ({"method": "fixbn", "fixbn-switch-round": 3}, "'fixbn-switch-round' \\(3\\) exceeds"),
        ({"method": "fedavg-bn", "transport": "grpc"}, "applies to method 'fedtan' only"),
        ({"method": "fedprox"}, "'method': 'fedprox' is not one of"),
    ],
)
def test_a_wrong_method_config_fails_at_start_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_flower({**BASE, **override})


def test_the_fixbn_switch_defaults_to_half_the_rounds():
    assert RunConfig.from_flower({**BASE, "num-rounds": 10}).fixbn_switch == 5
    assert RunConfig.from_flower({**BASE, "num-rounds": 1}).fixbn_switch == 1
