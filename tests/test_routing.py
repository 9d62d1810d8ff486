"""Routing statistics and route ids: hand-made cases, an independent numpy restatement, ranks."""

import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dopd.distributed import leave_process_group
from dopd_kernels import RouteConfig
from dopd_kernels.routing import route_tokens


def _route(q_self, q_teacher, valid=None, **cfg):
    ls = torch.tensor(q_self, dtype=torch.float64).log()
    lt = torch.tensor(q_teacher, dtype=torch.float64).log()
    valid = torch.ones_like(ls, dtype=torch.bool) if valid is None else torch.tensor(valid)
    return route_tokens(ls, lt, valid, RouteConfig(**cfg))


@pytest.mark.parametrize("normalize", ["none", "minmax", "zscore"])
def test_hand_made_four_routes(normalize):
    # A = |ln qT - ln qS| = (.118, .693, 2.197, 1.792): mean 1.2 -> tokens 2, 3 have a high gap;
    # token 2: qT > qS -> HT; token 3: qT < qS -> HS; token 0 confident (qS + qT high) -> LH; token 1 -> LL.
    res = _route([0.9, 0.1, 0.1, 0.6], [0.8, 0.05, 0.9, 0.1], trim=0.0, normalize=normalize)
    assert res.route.tolist() == [0, 1, 2, 3]
    assert res.adv_gap.tolist() == pytest.approx([math.log(0.9 / 0.8), math.log(2), math.log(9), math.log(6)])


def test_trim_drops_outliers_from_statistics_only():
    q_self = [0.5, 0.5, 0.5, 0.5, 0.5]
    q_teacher = [0.45, 0.4, 0.3, 0.25, 1e-6]  # the last gap is an outlier
    no_trim = _route(q_self, q_teacher, trim=0.0, normalize="none")
    # untrimmed, the outlier drags the mean gap to 2.9: only it is "high"
    assert no_trim.route.tolist() == [0, 0, 0, 1, 3]
    trimmed = _route(q_self, q_teacher, trim=0.2, normalize="none")
    # quantile 0.8 of 5 values lies between the 4th and 5th: the outlier leaves the mean ...
    assert trimmed.thresholds["adv_gap_bar"].item() == pytest.approx(
        np.mean(np.abs(np.log(q_teacher[:4]) - np.log(q_self[:4])))
    )
    # ... so more tokens sit above it, and the outlier itself is still routed (high gap, teacher behind: HS)
    assert trimmed.route.tolist() == [0, 0, 3, 3, 3]


def _numpy_routes(l_s, l_t, valid, trim, normalize):
    """dopd-method.md restated with numpy on the valid subset (np.quantile 'linear' = torch's default)."""
    idx = np.flatnonzero(valid)
    sig = {"A": np.abs(l_t - l_s), "qs": np.exp(l_s), "qt": np.exp(l_t)}
    norm, bar = {}, {}
    for k, x in sig.items():
        xv = x[idx]
        kept = xv[xv <= np.quantile(xv, 1 - trim)]
        if normalize == "minmax":
            f = lambda v: (v - kept.min()) / (kept.max() - kept.min())
        elif normalize == "zscore":
            f = lambda v: (v - kept.mean()) / kept.std()
        else:
            f = lambda v: v
        norm[k], bar[k] = f(x), f(kept).mean()
    route = np.full(len(l_s), -1)
    high = norm["A"] >= bar["A"]
    conf = norm["qs"] + norm["qt"] >= bar["qs"] + bar["qt"]
    ahead = sig["qt"] >= sig["qs"]
    route[idx] = np.where(high, np.where(ahead, 2, 3), np.where(conf, 0, 1))[idx]
    return route


@pytest.mark.parametrize("normalize", ["none", "minmax", "zscore"])
@pytest.mark.parametrize("trim", [0.0, 0.05, 0.37])
def test_matches_numpy_restatement(normalize, trim):
    g = torch.Generator().manual_seed(7)
    l_s = -3 * torch.rand(203, generator=g, dtype=torch.float64)
    l_t = -3 * torch.rand(203, generator=g, dtype=torch.float64)
    valid = torch.rand(203, generator=g) > 0.3
    res = route_tokens(l_s, l_t, valid, RouteConfig(trim=trim, normalize=normalize))
    expected = _numpy_routes(l_s.numpy(), l_t.numpy(), valid.numpy(), trim, normalize)
    assert res.route.tolist() == expected.tolist()
    assert set(expected[valid.numpy()]) == {0, 1, 2, 3}


def test_all_invalid_and_single_token():
    res = route_tokens(torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.bool), RouteConfig())
    assert res.route.tolist() == [-1] * 4
    one = route_tokens(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([True]), RouteConfig())
    assert one.route.tolist()[0] in (0, 1, 2, 3)
    empty = route_tokens(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool), RouteConfig())
    assert empty.route.numel() == 0


def _rank_main(rank, world, init_file, l_s, l_t, valid, sizes, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    res = route_tokens(l_s[lo:hi], l_t[lo:hi], valid[lo:hi], RouteConfig(stats_group=dist.group.WORLD))
    torch.save(res.route, os.path.join(out_dir, f"route{rank}.pt"))
    leave_process_group()


def test_statistics_over_ranks_equal_one_big_batch():
    g = torch.Generator().manual_seed(11)
    n = 90
    l_s = -4 * torch.rand(n, generator=g, dtype=torch.float64)
    l_t = -4 * torch.rand(n, generator=g, dtype=torch.float64)
    valid = torch.rand(n, generator=g) > 0.2
    sizes = [37, 53]  # ranks hold different token counts
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(2, os.path.join(tmp, "init"), l_s, l_t, valid, sizes, tmp), nprocs=2)
        routes = torch.cat([torch.load(os.path.join(tmp, f"route{r}.pt")) for r in range(2)])
    whole = route_tokens(l_s, l_t, valid, RouteConfig()).route
    assert torch.equal(routes, whole)
    # and the ranks' own statistics would have routed differently (the test would catch a missing gather)
    alone = torch.cat([route_tokens(l_s[:37], l_t[:37], valid[:37], RouteConfig()).route,
                       route_tokens(l_s[37:], l_t[37:], valid[37:], RouteConfig()).route])
    assert not torch.equal(alone, whole)
