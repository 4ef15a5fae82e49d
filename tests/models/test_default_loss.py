"""The model-family contract's default loss (models/protocol.output_loss): cross-entropy over the output's rows,
and one clear error naming the shapes the user has when the output or targets do not fit it."""
import re

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.autograd.function import OpError
from disttrain.models import protocol


def test_targets_of_any_shape_with_one_class_per_row_are_the_rows_cross_entropy():
    model = nn.Linear(3, 4)
    output = model(dt.tensor(np.ones((6, 3), np.float32)))
    targets = np.array([[0, 1, 2], [3, 0, 1]])                        # (T, B) of an LM: T*B rows
    loss = protocol.output_loss(model, output, dt.tensor(targets))
    assert loss.item() == pytest.approx(dt.nn.functional.cross_entropy(output, dt.tensor(targets.reshape(-1))).item())


@pytest.mark.parametrize("output_shape, targets, said", [
    ((4, 3), np.zeros((4, 2), np.int64), "expects one class index per row of the output (4, 3), got targets of shape (4, 2)"),
    ((4, 3, 2), np.zeros(4, np.int64), "expects an output of (rows, classes), got shape (4, 3, 2)"),
])
def test_an_output_or_targets_that_do_not_fit_are_named_as_given(output_shape, targets, said):
    model = nn.Identity()
    with pytest.raises(OpError, match=re.escape(f"Identity: the default loss (cross-entropy) {said}")):
        protocol.output_loss(model, dt.tensor(np.zeros(output_shape, np.float32)), dt.tensor(targets))


def test_an_output_that_is_not_one_tensor_asks_for_the_models_own_loss():
    output = {"logits": dt.tensor(np.zeros((4, 3), np.float32))}
    with pytest.raises(OpError, match=r"^Identity: forward returned a dict, .* define loss\(output, targets\)"):
        protocol.output_loss(nn.Identity(), output, dt.tensor(np.zeros(4, np.int64)))
