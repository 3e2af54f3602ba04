"""Building a torch model on the meta device skips the throwaway init without touching real tensors."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import torch
from torch import nn

from diptych.backends.torch import model as M
from diptych.core.spec import tiny_spec


def test_build_does_not_import_dynamo() -> None:
    # nn.init on a meta tensor goes through torch._refs, whose first call imports torch._dynamo (~2 s a process)
    code = ("import sys; from diptych.backends.torch import model as M; from diptych.core.spec import tiny_spec; "
            "s = tiny_spec('llama'); M.build(s, s.init_weights(0), device='cpu'); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_build_holds_the_given_weights_and_restores_init() -> None:
    spec = tiny_spec("llama")
    weights = spec.init_weights(3)
    before = {name: getattr(nn.init, name) for name in M._INIT_FUNCTIONS}
    model = M.build(spec, weights, device="cpu")
    assert {name: getattr(nn.init, name) for name in M._INIT_FUNCTIONS} == before
    got = M.export(model)
    assert got.keys() == weights.keys()
    for name, w in weights.items():
        np.testing.assert_array_equal(got[name], w)


def test_real_tensors_are_initialised_inside_the_context() -> None:
    # another thread (a LoRA adapter's init) may call nn.init while a build holds the patch
    t = torch.zeros(64, 64)
    with M._no_meta_init():
        nn.init.normal_(t, std=1.0)
        meta = torch.empty(4, 4, device="meta")
        assert nn.init.normal_(meta) is meta
    assert float(t.std()) > 0.5


def test_concurrent_builds_restore_init() -> None:
    before = {name: getattr(nn.init, name) for name in M._INIT_FUNCTIONS}
    spec = tiny_spec("llama")
    threads = [threading.Thread(target=M.build, args=(spec, spec.init_weights(i)), kwargs={"device": "cpu"})
               for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert {name: getattr(nn.init, name) for name in M._INIT_FUNCTIONS} == before
