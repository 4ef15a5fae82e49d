"""models/protocol.py's block_states / state_from_blocks on a recurrent model that defines neither: one line naming
the model's class, not an AttributeError from inside the protocol."""
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.models.protocol import block_states, state_from_blocks


class _RecurrentWithoutBlockStates(nn.Module):
    carries_state = True

    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(3, 3)

    def forward(self, inputs, state=None):
        return self.cell(inputs), state


def test_a_recurrent_model_without_block_states_is_named_in_one_line():
    model = _RecurrentWithoutBlockStates()
    blocks = [("cell", model.cell)]
    with pytest.raises(TypeError) as error:
        block_states(model, blocks, dt.zeros(2, 3))
    assert str(error.value) == ("_RecurrentWithoutBlockStates carries a state but defines no block_states(state): "
                                "a pipeline cannot give each block its part")


def test_a_recurrent_model_without_state_from_blocks_is_named_in_one_line():
    model = _RecurrentWithoutBlockStates()
    blocks = [("cell", model.cell)]
    with pytest.raises(TypeError) as error:
        state_from_blocks(model, blocks, [dt.zeros(2, 3)])
    assert str(error.value) == ("_RecurrentWithoutBlockStates carries a state but defines no "
                                "state_from_blocks(states): a pipeline cannot join its blocks' states into the "
                                "model's")
    assert state_from_blocks(model, blocks, [None]) is None       # no block has a state: nothing to join
