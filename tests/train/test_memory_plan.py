"""The memory estimate of a job: exact parameter counts, activations near what the memory meter sees."""
import pytest

from disttrain.tensor.memory import MemoryMeter
from disttrain.train.jobspec import JobSpecError, loads_job
from disttrain.train.loop import Trainer
from disttrain.train.memory_plan import check_fits, estimate, format_bytes, parameter_count

BASE = '[data]\nkind = "default_corpus"\nmax_bytes = 20000\n[train]\nmax_steps = 3\n'


@pytest.mark.parametrize("extra", [
    "[model]\nhidden = 64\nlayers = 2\n[data]\nbatch_size = 8\nbptt = 20\n[optim]\nkind = \"adam\"\n",
    "[model]\nhidden = 128\nlayers = 1\ndropout = 0.5\n[data]\nbatch_size = 20\nbptt = 35\n",
    "[model]\nhidden = 128\nlayers = 2\n[data]\nbatch_size = 20\nbptt = 35\n[memory]\n"
    "activation_checkpointing = \"sqrt\"\n[optim]\nmomentum = 0.9\n",
    "[model]\nhidden = 32\nembed = 32\nlayers = 3\ntie_weights = true\n[data]\nbatch_size = 6\nbptt = 10\n",
    "[model]\nkind = \"transformer_lm\"\nd_model = 64\nheads = 4\nlayers = 2\nmax_len = 64\n[data]\nbatch_size = 8\n"
    "bptt = 32\n[optim]\nkind = \"adam\"\n",
    "[model]\nkind = \"transformer_lm\"\nd_model = 32\nheads = 2\nlayers = 4\nd_ff = 48\ntie_weights = true\n"
    "[data]\nbatch_size = 4\nbptt = 16\n[memory]\nactivation_checkpointing = \"sqrt\"\n",
])
def test_parameters_exact_and_a_step_within_a_small_factor_of_the_meter(extra):
    sections = {}
    for block in (BASE + extra).split("["):
        if block.strip():
            name, _, body = block.partition("]")
            sections[name] = sections.get(name, "") + body
    spec = loads_job("".join(f"[{name}]{body}" for name, body in sections.items()))
    trainer = Trainer.from_job(spec, progress=False)
    vocab = trainer.data.vocab_size
    assert parameter_count(spec, vocab) == sum(p.numel() for p in trainer.params)
    need = estimate(spec, vocab, spec.data.batch_size)
    batches = iter(trainer.train_iter)
    trainer.train_step(*next(batches))                 # the optimizer state exists from here on
    with MemoryMeter("cpu", resident=trainer._resident_tensors()) as meter:
        trainer.train_step(*next(batches))
    step = meter.peak_bytes - meter.start_bytes        # a step's activations: its new gradients replace the old
    assert 0.75 * step <= need.activations <= 2.5 * step


def test_a_model_that_cannot_fit_is_refused_with_its_figures():
    spec = loads_job("[model]\nhidden = 100000\nlayers = 1\n", source="big.toml")
    with pytest.raises(JobSpecError) as raised:
        check_fits(spec, vocab_size=72, streams=20, processes=2, available=8 * 2**30)
    message = str(raised.value)
    assert message.startswith("big.toml: the job needs about 1.2 TiB of memory, this machine has 8.0 GiB available: "
                              "parameters 298.1 GiB, gradients 298.1 GiB, optimizer state 0 B, activations")
    assert "on each of the 2 processes on this machine" in message and "\n" not in message
    small = loads_job("[model]\nhidden = 16\n")
    assert check_fits(small, vocab_size=72, streams=20, available=8 * 2**30).total < 4 * 2**20
    wide = loads_job('[model]\nkind = "transformer_lm"\nd_model = 65536\n', source="wide.toml")
    with pytest.raises(JobSpecError, match=r"^wide.toml: the job needs about .*\(\[model\] d_model = 65536, layers = 2,"):
        check_fits(wide, vocab_size=72, streams=20, available=8 * 2**30)


def test_a_factory_model_is_not_estimated_before_it_is_built():
    spec = loads_job('[model]\nfactory = "somewhere:model"\nhidden = 100000\n')
    assert estimate(spec, 72, 20) is None and check_fits(spec, vocab_size=72, streams=20, available=2**20) is None


def test_pipeline_stages_share_all_but_the_parameters():
    spec = loads_job("[model]\nhidden = 64\n[optim]\nkind = \"adam\"\n")
    whole, stage = estimate(spec, 100, 10), estimate(spec, 100, 10, stages=2)
    assert stage.parameters == whole.parameters and stage.optimizer == whole.optimizer // 2
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(3 * 2**40) == "3.0 TiB"


def test_an_auto_job_is_estimated_at_most_at_its_budget_so_one_that_auto_fits_is_not_refused():
    """"auto" plans the step to what budget_mb leaves after the parameters and optimizer state: a job whose plain
    activations exceed the machine but whose budget fits it must pass the check "auto" will then meet."""
    job = ('[model]\nkind = "transformer_lm"\nd_model = 64\nheads = 4\nlayers = 48\nmax_len = 1024\n'
           '[data]\nbatch_size = 32\nbptt = 1024\n[memory]\nactivation_checkpointing = "{}"\n{}')
    plain = loads_job(job.format("none", ""))
    auto = loads_job(job.format("auto", "budget_mb = 1024\n"))
    machine = 2 * 2**30
    with pytest.raises(JobSpecError, match="choose a smaller model or batch"):
        check_fits(plain, vocab_size=72, streams=32, available=machine)
    need = check_fits(auto, vocab_size=72, streams=32, available=machine)
    assert need.total == 1024 * 2**20
    assert need.activations < estimate(plain, 72, 32).activations
