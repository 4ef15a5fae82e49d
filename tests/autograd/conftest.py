import pytest

import disttrain as dt


@pytest.fixture(autouse=True)
def _restore_rng_state():
    """Tests here call dt.manual_seed; leave the generators as they were for the rest of the suite."""
    state = dt.get_rng_state()
    yield
    dt.set_rng_state(state)
