"""The Transformer LM trains in parameter-server mode as in one process: with consistency = "sync" and one
worker, bit for bit the same parameters, losses and evaluation (the LSTM LM's test, for the second family)."""
import numpy as np

from disttrain.paramserver.job import run_worker
from disttrain.train.loop import Trainer

from ps_testing import train_worker_0

TRANSFORMER = ('model.kind="transformer_lm"', "model.d_model=16", "model.heads=2", "model.layers=2", "model.d_ff=32",
               "model.max_len=16", "model.dropout=0.1")


def test_transformer_worker_sync_equals_local_trainer(ps_job):
    spec, _ = ps_job(*TRANSFORMER, "ps.consistency=sync", "ps.servers=2", "ps.workers=1", "optim.kind=sgd",
                     "optim.lr=0.5", "optim.momentum=0.9", "optim.warmup_steps=3", "train.max_steps=8",
                     n_chars=1500)
    local = Trainer.from_job(spec, out_dir=None, progress=False)
    local.fit()
    trainer, servers, evals = train_worker_0(spec, 2)
    assert trainer.step == local.step == servers[0].updates == 8
    for (name, a), b in zip(local.model.named_parameters(), trainer.params):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    assert evals["valid"].loss == local.evals["valid"].loss
