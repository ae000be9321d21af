"""Specification of the BN exchange: the server-side combination and the in-process hub.

``combine_moments`` / ``combine_grad_sums`` are what every transport computes; they must give the
exact statistics of the union batch and refuse, naming the client and the layer, any
contribution that would corrupt them. ``InProcessHub`` must never leave a client thread waiting
forever: out-of-step clients, an abort and a missing client all end in ``BNSyncError``.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from common.fedtan.bn_channel import (
    BNSyncError,
    GradSums,
    Moments,
    combine_grad_sums,
    combine_moments,
    share_of_union,
)
from common.fedtan.inprocess import InProcessHub

LAYER = "layer1.0.bn2"


def moments_of(x: torch.Tensor) -> Moments:
    """Per-channel moments of a (B, C, ...) batch, as a client computes them."""
    dims = [0, *range(2, x.dim())]
    count = x.numel() // x.size(1)
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return Moments(count, mean, var * count)


def client_batches(sizes=(3, 7, 1, 12), channels=5, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Different location and scale per client: the non-IID case the formula exists for.
    return [
        torch.randn(b, channels, 2, 3, generator=g, dtype=torch.float64) * (1 + k) + 3 * k
        for k, b in enumerate(sizes)
    ]


def good(channels: int = 3) -> Moments:
    return Moments(4, torch.zeros(channels, dtype=torch.float64), torch.ones(channels))


# --- combine_moments / combine_grad_sums: exact ---------------------------------------------


def test_combine_moments_equals_moments_of_the_concatenation():
    xs = client_batches()
    union = combine_moments(LAYER, {k: moments_of(x) for k, x in enumerate(xs)})
    expected = moments_of(torch.cat(xs))
    assert union.count == expected.count == sum(x.numel() // x.size(1) for x in xs)
    assert union.mean.dtype == union.m2.dtype == torch.float64
    torch.testing.assert_close(union.mean, expected.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(union.m2, expected.m2, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(union.var, torch.cat(xs).transpose(0, 1).flatten(1).var(1, False))


def test_combine_moments_computes_in_float64_from_float32_parts():
    xs = [x.float() for x in client_batches()]
    union = combine_moments(LAYER, {k: moments_of(x) for k, x in enumerate(xs)})
    assert union.mean.dtype == torch.float64
    exact = moments_of(torch.cat(xs).double())
    # The bound is float32's own noise: the moments of the concatenation computed in float32.
    single = moments_of(torch.cat(xs))
    for field in ("mean", "var"):
        noise = (getattr(single, field).double() - getattr(exact, field)).abs().max()
        error = (getattr(union, field) - getattr(exact, field)).abs().max()
        assert error <= 10 * noise, (field, error, noise)


def test_combine_moments_is_independent_of_client_order():
    xs = client_batches()
    parts = {k: moments_of(x) for k, x in enumerate(xs)}
    forward = combine_moments(LAYER, parts)
    backward = combine_moments(LAYER, dict(reversed(list(parts.items()))))
    shuffled = combine_moments(LAYER, {k: parts[k] for k in (2, 0, 3, 1)})
    for other in (backward, shuffled):
        assert other.count == forward.count
        torch.testing.assert_close(other.mean, forward.mean, rtol=0, atol=1e-13)
        torch.testing.assert_close(other.m2, forward.m2, rtol=1e-13, atol=1e-11)


def test_combine_grad_sums_is_the_sum():
    g = torch.Generator().manual_seed(1)
    parts = {k: GradSums(torch.randn(4, generator=g), torch.randn(4, generator=g)) for k in "abc"}
    total = combine_grad_sums(LAYER, parts)
    assert total.sum_dy.dtype == total.sum_dy_xhat.dtype == torch.float64
    torch.testing.assert_close(total.sum_dy, sum(p.sum_dy.double() for p in parts.values()))
    torch.testing.assert_close(
        total.sum_dy_xhat, sum(p.sum_dy_xhat.double() for p in parts.values())
    )


def test_share_of_union():
    assert share_of_union(3, 12) == 0.25
    for local, total in ((0, 4), (5, 4), (1, 0), (-1, 4)):
        with pytest.raises(BNSyncError, match="inconsistent counts"):
            share_of_union(local, total)


# --- combine_moments / combine_grad_sums: refusals ------------------------------------------

F64 = torch.float64
BAD_MOMENTS = {
    "zero count": (Moments(0, torch.zeros(3, dtype=F64), torch.zeros(3)), r"count must be a"),
    "negative count": (Moments(-2, torch.zeros(3, dtype=F64), torch.ones(3)), r"count must be"),
    "float count": (Moments(2.0, torch.zeros(3, dtype=F64), torch.ones(3)), r"count must be"),
    "negative m2": (
        Moments(4, torch.zeros(3), torch.tensor([1.0, -1e-3, 2.0])),
        r"negative sum of squared deviations",
    ),
    "nan mean": (Moments(4, torch.tensor([0.0, float("nan"), 1.0]), torch.ones(3)), "non-finite"),
    "inf m2": (Moments(4, torch.zeros(3), torch.tensor([1.0, float("inf"), 1.0])), "non-finite"),
    "integer dtype": (Moments(4, torch.zeros(3, dtype=torch.int64), torch.ones(3)), "dtype"),
    "m2 of another shape": (Moments(4, torch.zeros(3), torch.ones(4)), "per-channel vectors"),
}


@pytest.mark.parametrize("bad", BAD_MOMENTS.values(), ids=BAD_MOMENTS.keys())
def test_combine_moments_refuses_bad_part_naming_client_and_layer(bad):
    moments, reason = bad
    parts = {0: good(), "client-7": moments, 2: good()}
    with pytest.raises(BNSyncError, match=rf"client client-7, layer '{LAYER}'.*{reason}"):
        combine_moments(LAYER, parts)


def test_combine_moments_refuses_non_1d_vectors():
    # Every client sending (C, 1) vectors agree on the shape, and are still refused.
    parts = {k: Moments(4, torch.zeros(3, 1), torch.ones(3, 1)) for k in range(2)}
    with pytest.raises(BNSyncError, match=rf"client 0, layer '{LAYER}'.*per-channel vectors"):
        combine_moments(LAYER, parts)


def test_combine_moments_refuses_mismatched_channel_counts():
    parts = {0: good(3), 1: good(3), 2: good(4)}
    with pytest.raises(BNSyncError, match=rf"layer '{LAYER}'.*number of channels.*2: \(4,\)"):
        combine_moments(LAYER, parts)


def test_combine_refuses_nothing_to_combine():
    with pytest.raises(BNSyncError, match="nothing to combine"):
        combine_moments(LAYER, {})
    with pytest.raises(BNSyncError, match="nothing to combine"):
        combine_grad_sums(LAYER, {})


@pytest.mark.parametrize(
    "bad, reason",
    [
        (GradSums(torch.tensor([0.0, float("nan")]), torch.zeros(2)), "sum_dy has non-finite"),
        (GradSums(torch.zeros(2), torch.tensor([float("-inf"), 0.0])), "sum_dy_xhat has non-fin"),
        (GradSums(torch.zeros(2, dtype=torch.int32), torch.zeros(2)), "dtype torch.int32"),
        (GradSums(torch.zeros(2), torch.zeros(3)), "per-channel vectors"),
    ],
)
def test_combine_grad_sums_refuses_bad_part_naming_client_and_layer(bad, reason):
    ok = GradSums(torch.zeros(2), torch.zeros(2))
    with pytest.raises(BNSyncError, match=rf"client 1, layer '{LAYER}'.*{reason}"):
        combine_grad_sums(LAYER, {0: ok, 1: bad})
    with pytest.raises(BNSyncError, match=rf"layer '{LAYER}'.*number of channels"):
        combine_grad_sums(LAYER, {0: ok, 1: GradSums(torch.zeros(5), torch.zeros(5))})


# --- InProcessHub ---------------------------------------------------------------------------


def run_clients(hub: InProcessHub, work, ranks=None, join_timeout: float = 10.0) -> list:
    """Run ``work(channel)`` for each rank in a thread; return each one's result or exception."""
    ranks = range(hub.num_clients) if ranks is None else ranks
    results: dict[int, object] = {}

    def target(rank: int) -> None:
        try:
            results[rank] = work(rank, hub.channel(rank))
        except BaseException as error:  # noqa: BLE001 - inspected by the test
            results[rank] = error

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_timeout)
    assert not any(t.is_alive() for t in threads), "a client thread was left hanging"
    return [results[r] for r in ranks]


def test_hub_all_reduces_moments_and_grad_sums_in_sequence():
    xs = client_batches(sizes=(2, 5, 3))
    # Each layer sees other data, so that an answer for the wrong layer cannot pass.
    scales = {"bn1": 2.0, "bn2": -3.0}
    hub = InProcessHub(3, timeout=10)

    def work(rank, channel):
        outs = [channel.reduce_moments(n, moments_of(xs[rank] * s)) for n, s in scales.items()]
        outs.append(channel.reduce_grad_sums("bn2", GradSums(torch.ones(5), torch.ones(5) * rank)))
        return outs

    results = run_clients(hub, work)
    for *layers, sums in results:
        for union, scale in zip(layers, scales.values(), strict=True):
            expected = moments_of(torch.cat(xs) * scale)
            assert union.count == expected.count
            torch.testing.assert_close(union.mean, expected.mean, rtol=0, atol=1e-12)
            torch.testing.assert_close(union.m2, expected.m2, rtol=1e-12, atol=1e-10)
        # sum_dy: 1 from each of 3 clients; sum_dy_xhat: the ranks 0 + 1 + 2.
        torch.testing.assert_close(sums.sum_dy, torch.full((5,), 3.0, dtype=F64), rtol=0, atol=0)
        torch.testing.assert_close(
            sums.sum_dy_xhat, torch.full((5,), 3.0, dtype=F64), rtol=0, atol=0
        )


def test_hub_out_of_step_clients_all_get_bnsyncerror():
    hub = InProcessHub(3, timeout=10)

    def work(rank, channel):
        return channel.reduce_moments("bn2" if rank == 1 else "bn1", good())

    results = run_clients(hub, work)
    for error in results:
        assert isinstance(error, BNSyncError), error
        assert "out of step" in str(error) and "'bn1'" in str(error) and "'bn2'" in str(error)


def test_hub_forward_and_backward_at_the_same_layer_are_out_of_step():
    hub = InProcessHub(2, timeout=10)

    def work(rank, channel):
        if rank == 0:
            return channel.reduce_moments("bn1", good())
        return channel.reduce_grad_sums("bn1", GradSums(torch.zeros(3), torch.zeros(3)))

    for error in run_clients(hub, work):
        assert isinstance(error, BNSyncError) and "out of step" in str(error)


def test_hub_verify_names_the_first_bad_contribution_after_the_step():
    """The hub checks the values after the step, not at each exchange: every exchange
    completes (with the unusable union), then ``verify`` names the client and layer of the
    first bad contribution (forward or backward), and forgets what it has verified."""
    hub = InProcessHub(3, timeout=10)
    nan = Moments(4, torch.full((3,), float("nan")), torch.ones(3))
    inf = GradSums(torch.zeros(3), torch.full((3,), float("inf")))
    ok = GradSums(torch.zeros(3), torch.zeros(3))

    def work(rank, channel):
        return [
            channel.reduce_moments("bn1", good()),
            channel.reduce_moments("bn2", nan if rank == 2 else good()),
            channel.reduce_grad_sums("bn2", inf if rank == 0 else ok),
        ]

    for _, bad_forward, bad_backward in run_clients(hub, work):
        assert bad_forward.mean.isnan().all() and bad_backward.sum_dy_xhat.isinf().all()
    with pytest.raises(BNSyncError, match=r"client 2, layer 'bn2'.*non-finite"):
        hub.verify()
    hub.verify()  # verified: nothing left

    results = run_clients(hub, lambda rank, ch: ch.reduce_grad_sums("bn1", inf if rank else ok))
    assert all(isinstance(r, GradSums) for r in results)
    with pytest.raises(BNSyncError, match=r"client 1, layer 'bn1'.*sum_dy_xhat has non-finite"):
        hub.verify()


def test_hub_verify_passes_good_values():
    hub = InProcessHub(2, timeout=10)
    run_clients(hub, lambda rank, ch: ch.reduce_moments("bn1", good()))
    hub.verify()


def test_hub_abort_releases_waiting_clients():
    hub = InProcessHub(3, timeout=60)
    release = threading.Timer(0.2, hub.abort, args=(RuntimeError("client 2 crashed"),))
    release.start()
    start = time.monotonic()
    results = run_clients(hub, lambda rank, ch: ch.reduce_moments("bn1", good()), ranks=[0, 1])
    assert time.monotonic() - start < 5
    for error in results:
        assert isinstance(error, BNSyncError)
        assert "aborted" in str(error) and "client 2 crashed" in str(error)
    # The hub stays broken: a late client does not wait either.
    with pytest.raises(BNSyncError, match="client 2 crashed"):
        hub.channel(2).reduce_moments("bn1", good())


def test_hub_times_out_when_a_client_never_arrives():
    hub = InProcessHub(3, timeout=0.3)
    start = time.monotonic()
    results = run_clients(hub, lambda rank, ch: ch.reduce_moments("bn4", good()), ranks=[0, 2])
    assert time.monotonic() - start < 5
    for error in results:
        assert isinstance(error, BNSyncError)
        assert "not all 3 clients arrived within 0.3 s" in str(error) and "'bn4'" in str(error)


def test_hub_refuses_bad_sizes_and_ranks():
    with pytest.raises(ValueError, match="num_clients must be >= 1"):
        InProcessHub(0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        InProcessHub(2).channel(2)
