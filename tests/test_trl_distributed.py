"""DOPDTrainer on 2 CPU processes (torchrun, gloo): 2 steps, routing statistics pooled over both ranks."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from dopd_kernels import ROUTES, RouteConfig  # noqa: E402
from dopd_kernels.routing import route_tokens  # noqa: E402

from _dist_common import torchrun  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
TIMEOUT_S = 300  # a hang (a collective one rank never joins) fails the test instead of stalling the suite


def _launch(out_dir: pathlib.Path) -> None:
    rc, output, _ = torchrun([str(HERE / "trl_dist_worker.py"), str(out_dir)], TIMEOUT_S, cwd=str(out_dir), env={})
    assert rc == 0, output[-6000:]


@pytest.mark.slow
def test_two_processes_pool_the_routing_statistics(tmp_path):
    _launch(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [len(r["records"]) for r in ranks] == [2, 2]  # one micro-batch per step, 2 steps
    config = RouteConfig.preset("dopd", top_k=8)
    history = [h for h in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
               if "dopd/frac/HT" in h]
    assert [h["step"] for h in history] == [1, 2]
    for step in range(2):
        recs = [r["records"][step] for r in ranks]
        assert all(rec["grouped"] for rec in recs)
        valid = [rec["route"] >= 0 for rec in recs]
        l_self = [rec["q_self"][v].log() for rec, v in zip(recs, valid)]
        l_teacher = [rec["q_teacher"][v].log() for rec, v in zip(recs, valid)]
        # Routing the two ranks' tokens together in one process gives what each rank computed.
        pooled = route_tokens(torch.cat(l_self), torch.cat(l_teacher), torch.ones(sum(len(x) for x in l_self),
                                                                                  dtype=torch.bool), config)
        for rec in recs:
            for key, value in pooled.thresholds.items():
                torch.testing.assert_close(rec["thresholds"][key], value, rtol=1e-9, atol=1e-12, msg=key)
        assert torch.equal(torch.cat([rec["route"][v] for rec, v in zip(recs, valid)]), pooled.route)
        # ... and differs from what either rank's tokens alone would give: the pooling is real.
        local = route_tokens(l_self[0], l_teacher[0], torch.ones_like(l_self[0], dtype=torch.bool), config)
        assert any(not torch.allclose(local.thresholds[k], pooled.thresholds[k]) for k in pooled.thresholds)
        # The logged fractions are over both ranks' tokens.
        counts = torch.bincount(pooled.route, minlength=len(ROUTES)).double() / pooled.route.numel()
        logged = torch.tensor([history[step][f"dopd/frac/{r}"] for r in ROUTES], dtype=torch.float64)
        torch.testing.assert_close(logged, counts, rtol=1e-12, atol=1e-12)
        assert history[step]["dopd/n_tokens"] == pooled.route.numel()
