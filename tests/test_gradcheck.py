"""torch.autograd.gradcheck of the reference and the PyTorch path at tiny sizes (float64).

The self pass is stop-gradient: a numerical derivative that moved it would differentiate through the
routing statistics and the self distribution, which the loss does not define. So the self pass gets a
detached copy of the student's projection as ``self_weight``.

``vanilla_opd_sampled`` is left out on purpose: its loss (l_S - l_src).detach() * l_S has, by
definition, a gradient that is not the derivative of its value (the coefficient is held fixed); the
comparison with the reference covers its gradient instead.
"""

import pytest
import torch
from torch.autograd import gradcheck

from dopd_kernels import PRESETS, RouteConfig, routed_loss

from _inputs import make_inputs


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "vanilla_opd_sampled"])
def test_gradcheck(backend, preset):
    inp = make_inputs(lead=(2, 5), hs=5, ht=7, vocab=9, vt=11, mask_frac=0.2, hard_labels=True)
    cfg = RouteConfig.preset(preset, top_k=4, chunk_size=3, ce_weight=0.3, temperature=1.3)
    h, w, b = inp.fresh_leaves()

    def loss(h, w, b):
        return routed_loss(
            h, w, inp.teacher_hidden, inp.teacher_weight, inp.self_hidden, inp.target_ids, inp.mask,
            student_bias=b, teacher_bias=inp.teacher_bias, self_weight=inp.student_weight.detach().clone(),
            self_bias=inp.student_bias.detach().clone(), hard_labels=inp.hard_labels, config=cfg, backend=backend,
        ).loss

    assert gradcheck(loss, (h, w, b), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)
