"""Two Python threads running the ops at once get the same results as one thread alone
(per-call scratch, nothing static)."""

import threading

import torch

import selfattn
from tests.common import sample_inputs


def test_two_threads_at_once():
    inputs = [sample_inputs(2, 4, 300, 300, 64, requires_grad=True) for _ in range(2)]
    layer = selfattn.SelfAttention(64, 64, num_heads=4, bias=True, causal=True)
    xs = [torch.randn(2, 200, 64, requires_grad=True) for _ in range(2)]

    def work(i):
        q, k, v = inputs[i]
        out = selfattn.attention(q, k, v, causal=bool(i))
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        layer_out = layer(xs[i])
        layer_grads = torch.autograd.grad(layer_out.square().sum(), [xs[i], layer.in_proj_weight])
        return [out, *grads, layer_out, *layer_grads]

    expected = [work(i) for i in range(2)]
    for _ in range(3):
        results = [None, None]
        errors = []

        def run(i):
            try:
                results[i] = work(i)
            except Exception as error:  # surfaced below
                errors.append(error)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for got, want in zip(results, expected):
            for a, b in zip(got, want):
                assert torch.equal(a, b)
