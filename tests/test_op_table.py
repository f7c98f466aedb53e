"""The op table (selfattn/_op_table.py): every argument a derivative op needs is found by name among
the forward op's arguments and outputs, and Signature binds and rebuilds calls by schema name."""

import pytest
import torch

import selfattn  # noqa: F401  (registers the ops)
from selfattn._op_table import _REQUIRED, OPS, Signature


def _unsourced(needed: Signature, forward: Signature, extra: set) -> list:
    """The required arguments of ``needed`` that no name of the forward op (argument or output)
    nor ``extra`` provides."""
    provided = set(forward.names) | set(forward.returns) | extra
    return [n for n, d in zip(needed.names, needed.defaults) if d is _REQUIRED and n not in provided]


FORWARD_OPS = [d for d in OPS.values() if d.backward is not None]


@pytest.mark.parametrize("description", FORWARD_OPS, ids=lambda d: d.name)
def test_the_backward_finds_every_argument_by_name(description):
    forward = description.signature
    backward = OPS[description.backward].signature
    assert _unsourced(backward, forward, {"grad_" + forward.returns[0], "output_mask"}) == []
    # Its outputs are the gradients of the differentiable inputs, in order.
    assert len(backward.returns) == len(description.differentiable)
    assert set(description.differentiable) <= forward.tensor_names
    assert set(description.kept_outputs) | {forward.returns[0]} == set(forward.returns)


def test_attention_jvp_finds_every_argument_by_name():
    description = OPS["attention_fwd"]
    jvp = OPS[description.jvp].signature
    assert _unsourced(jvp, description.signature, {"tangent_" + n for n in description.differentiable}) == []


def test_a_missing_source_is_reported():
    """The check above fails when the backward needs an argument the forward does not have."""
    forward = OPS["attention_fwd"].signature
    backward = OPS["attention_bwd"].signature
    planted = Signature(backward.names + ("temperature",), backward.defaults + (_REQUIRED,), backward.tensor_names,
                        backward.returns)
    assert _unsourced(planted, forward, {"grad_out"}) == ["temperature"]


def test_signature_binds_and_rebuilds_by_name():
    signature = OPS["attention_fwd"].signature
    q = torch.zeros(1)
    values = signature.bind((q, q, q, True, 0.5))
    assert values["causal"] is True and values["scale"] == 0.5
    assert values["attn_mask"] is None and values["window_left"] == -1 and values["rng_state"] is None
    # Trailing arguments at their defaults are left out; one that differs keeps those before it.
    assert signature.positional(values) == [q, q, q, True, 0.5]
    values["dropout_p"] = 0.25
    rebuilt = signature.positional(values)
    assert rebuilt[5:] == [None, -1, -1, 0, 0.25] and len(rebuilt) == 10
    # An int that equals a float default is not the default (it is passed on, for the op to judge).
    values["dropout_p"] = 0
    assert len(signature.positional(values)) == 10
    with pytest.raises(TypeError, match="missing argument.*scale"):
        signature.positional({"q": q, "k": q, "v": q, "causal": False})


def test_groups_name_schema_arguments():
    for description in OPS.values():
        for group in description.groups:
            assert set(group.arguments) <= set(description.signature.names), (description.name, group.name)
        assert set(description.folded) | set(description.folded_masks) <= description.signature.tensor_names
