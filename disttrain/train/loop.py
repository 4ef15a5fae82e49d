"""Trainer: the one training loop, for any model and data source, in every mode.

    trainer = Trainer(model, data, optimizer, mode=LocalMode(), out_dir="runs/mine")   # from objects
    trainer = Trainer.from_job(spec, out_dir="runs/charlm")                              # from a job file
    trainer.restore(load_checkpoint("runs/charlm"))     # only when resuming
    results = trainer.fit()                             # {"valid": EvalResult, "test": EvalResult}

The model follows disttrain.models.protocol (any Module; a recurrent one carries a state), the data
disttrain.data.source (batches, shares, evaluation splits), and the mode disttrain.train.mode (how the run is
spread over processes). Settings come from a JobSpec (`spec`: [train], [optim] clip_norm and loss, [memory]
budget_mb, and activation_checkpointing = "auto", which the constructor plans for the budget on the first batch:
train/auto_checkpointing.py, `checkpoint_choice`); `dt.train.fit` builds one from keyword arguments.

One step (`train_step`):
    mode.forward_backward (forward from the carried state, loss, backward; every .grad then holds the whole
    batch's gradient) -> mode.clip_grad_norm (the global norm) -> mode.step(optimizer) -> per-step LR schedule
    -> carry the detached state into the next batch.
When the loss (averaged over processes) or the gradient norm is NaN or infinite, no process takes the update or
the schedule step and the state restarts from zeros; [train] on_nonfinite then stops the run (TrainingDiverged)
or goes on ("skip", at most MAX_SKIPS_IN_A_ROW skipped steps in a row).

Sequential data (truncated BPTT): the carried state flows across batches but gradients stop at batch borders,
and it restarts from None (zeros) at every epoch. The per-epoch LR schedule is stepped after each epoch.

Evaluation (`evaluate`) runs under no_grad with model.eval() (no dropout) over the data's evaluation batches,
each process its share (`mode.eval_share`), the loss sums and target counts added up (`mode.reduce`), so every
process gets the one-process figure: the target-weighted mean loss, and for language data perplexity = exp of
it (and bits per character for character-level corpora). Validation runs every `eval_every` steps or after
every epoch, and once more at the end (unless it just ran) followed by the test split.

NOTE (exact resume): everything a step depends on is in the job checkpoint — weights, optimizer buffers and
scalars, LR schedules, the data cursor, the carried state, the RNG state and the metrics accumulators — and
evaluation consumes no randomness and touches no training state. A run resumed from the checkpoint of step k
therefore computes bit-for-bit the same steps k+1, k+2, ... as one that was never stopped (same device, same
float dtype, same BLAS).
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path

import disttrain as dt
from disttrain import trace
from disttrain.data.source import EVAL_STREAMS
from disttrain.models import protocol
from disttrain.tensor.host_allocator import retain_freed_memory
from disttrain.tensor.memory import MemoryMeter
from disttrain.tensor.random import step_stream
from disttrain.train import memory_plan, saving
from disttrain.train.auto_checkpointing import plan_checkpointing
from disttrain.train.build import (Schedules, apply_checkpointing_setting, build_data, build_model, build_optimizer,
                                   build_schedules)
from disttrain.train.jobspec import loads_job
from disttrain.train.metrics import LN2, MetricsWriter, perplexity, plot_curves, shortfall
from disttrain.train.mode import LocalMode, RunState
from disttrain.train.outputs import OutputGuard
from disttrain.train.progress import Progress
from disttrain.train.resume import apply_lr_change, check_same_model, resume_changes

__all__ = ["Trainer", "EvalResult", "TrainingInterrupted", "TrainingDiverged", "MemoryBudgetExceeded",
           "check_new_run", "epoch_label", "EVAL_BATCH_SIZE"]

EVAL_BATCH_SIZE = EVAL_STREAMS
MAX_SKIPS_IN_A_ROW = 10        # [train] on_nonfinite = "skip" stops the run after this many skipped steps in a row
METRICS_FILE, CONFIG_FILE, CURVES_FILE = "metrics.jsonl", "config.toml", "curves.png"
# The job keys a Trainer applies to a model, data and optimizer it is given ({section: None (all) or keys});
# from_job builds those three from the rest of the job.
APPLIED_SETTINGS = {"train": None, "optim": ("clip_norm", "loss"), "memory": None, "parallel": None}


class MemoryBudgetExceeded(RuntimeError):
    """A training step needed more array memory than the job's [memory] budget_mb."""


class TrainingInterrupted(Exception):
    """Training stopped on request (SIGINT/SIGTERM) after writing a checkpoint; `signal_name` says why."""

    def __init__(self, signal_name, step):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint written")
        self.signal_name, self.step = signal_name, step


class TrainingDiverged(RuntimeError):
    """A loss, gradient norm or weight became NaN or infinite (see [train] on_nonfinite); nothing non-finite was
    written. `step`: the step it happened at; `last_checkpoint`: the newest good checkpoint (a Path) or None."""

    def __init__(self, step, what, last_checkpoint):
        where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint is not None
                 else "no checkpoint was written before it")
        super().__init__(f"step {step}: {what}; {where}")
        self.step, self.last_checkpoint = step, last_checkpoint


@dataclass
class EvalResult:
    split: str
    loss: float          # mean loss per target (nats for cross-entropy)
    tokens: int          # targets evaluated
    step: int
    seconds: float = 0.0

    @property
    def ppl(self):
        return perplexity(self.loss)

    @property
    def bpc(self):
        return self.loss / LN2

    def to_dict(self):
        return {"split": self.split, "loss": self.loss, "tokens": self.tokens, "step": self.step,
                "seconds": self.seconds}


class Trainer:
    """Trains `model` on `data` with `optimizer` in `mode`; writes metrics, curves, config and checkpoints
    into `out_dir` (None: nothing written).

    optimizer: an Optimizer over model's parameters, or a factory params -> Optimizer. schedules: None, or a
    factory optimizer -> Schedules (disttrain.train.build). spec: the settings (a JobSpec; default: every key
    at its default). progress: True/False forces a tqdm bar on/off; None picks one when stdout is a terminal.
    overwrite: a new (not restored) run may replace an earlier run's checkpoints, metrics and curves in
    out_dir; without it, fit() raises RunExistsError when out_dir holds an earlier run (or, on a process other
    than the main one, when its own checkpoint directory holds checkpoints).
    """

    def __init__(self, model, data, optimizer, spec=None, mode=None, schedules=None, out_dir=None, progress=None,
                 overwrite=False):
        self.spec = spec if spec is not None else loads_job("")
        self.mode = mode if mode is not None else LocalMode()
        self.data = data
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._progress_mode = progress
        self.overwrite = overwrite

        # before prepare: a mode's gradient hooks must not see these steps; the estimate profiles the plan
        apply_checkpointing_setting(self.spec, model)          # a model given as an object, as one built from a job
        self.checkpoint_choice = None
        if self.spec.memory.activation_checkpointing == "auto":      # (a pipeline stage's holding needs prepare)
            self.checkpoint_choice = plan_checkpointing(self.spec, model, data, self.mode.train_share(),
                                                        self.mode.memory_holding(), optimizer)
        profile = self._profile_memory(model, data)
        self.model, self.optimizer = self.mode.prepare(model, optimizer, data)
        self.params = list(self.model.parameters())
        self.memory_estimate = (memory_plan.predict(self.model, self.optimizer, profile, self.mode.memory_holding())
                                if profile is not None else None)
        self.measured_peak_bytes = None   # the largest metered step's, as memory_plan defines it (see _metered_step)
        self.schedules = schedules(self.optimizer) if schedules is not None else Schedules()
        self.train_iter = data.train_batches(self.mode.train_share())

        self.step = 0                 # optimizer steps taken
        self.epoch = 0                # epochs completed
        self.state = None             # the model's carried state into the next batch; None = zeros
        self.evals = {}               # split -> last EvalResult
        self.finished = False
        self.step_lr = self.optimizer.param_groups[0]["lr"]
        self._acc = _fresh_accumulators()
        self._elapsed_before = 0.0    # training seconds of earlier (resumed-from) processes
        self._metrics_position = None  # where to continue metrics.jsonl when resuming
        self._resumed = False
        self.resume_changes = []      # lines saying what a restore changed or found (the lr, metrics rows lost)
        self.last_checkpoint = None   # the newest checkpoint written or restored (main process)
        self.skipped_step = False     # the last step's update was dropped: its loss or gradient norm was not finite
        self._skips_in_a_row = 0
        self._skip_report = None      # "loss nan, gradient norm 3.2" of the last dropped step
        self._best_valid = None       # the lowest valid loss so far (for [train] keep_best)
        self._stop_signal = None
        self._reported_measured_peak = False   # "auto" checkpointing: the first metered step's peak was logged
        self._started = self._tick = None   # perf_counter at fit() start / at the last train log
        self.metrics = None
        self.outputs = None if out_dir is None else OutputGuard(out_dir, self._say, lambda: self.last_checkpoint)
        self.progress = None
        self._spec_describes_all = False       # from_job: the spec also describes the model, data and optimizer

    def _profile_memory(self, model, data):
        """One profiled forward/backward of this process's share of the first training batch (None: no batch)."""
        try:
            inputs, targets = next(iter(data.train_batches(self.mode.train_share())))
        except StopIteration:
            return None
        return memory_plan.profile_step(model, inputs, targets, holding=self.mode.memory_holding())

    @classmethod
    def from_job(cls, spec, out_dir=None, mode=None, data=None, progress=None, overwrite=False):
        """The job's model, data, optimizer and LR schedules (seeded with [train] seed first), in `mode`
        (default: local). data: a prebuilt data source (default: the job's)."""
        dt.manual_seed(spec.train.seed)
        data = data if data is not None else build_data(spec)
        model = build_model(spec, data).to(spec.train.device)
        trainer = cls(model, data, lambda params: build_optimizer(spec, params), spec=spec, mode=mode,
                      schedules=lambda optimizer: build_schedules(spec, optimizer), out_dir=out_dir,
                      progress=progress, overwrite=overwrite)
        trainer._spec_describes_all = True
        return trainer

    @property
    def total_steps(self):
        """The steps the run takes in all: epochs x batches per epoch, capped by max_steps."""
        total = self.spec.train.epochs * len(self.train_iter)
        max_steps = self.spec.train.max_steps
        return min(total, max_steps) if max_steps is not None else total

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self, inputs, targets):
        """One batch: inputs, targets NumPy arrays (this process's share). Returns (mean loss, grad norm before
        clipping)."""
        trace.set_step(self.step + 1)              # names this step in traces and watchdog messages
        self.optimizer.zero_grad()
        scale = inputs.shape[0] if self.spec.optim.loss == "sum_over_time" else 1.0
        with step_stream(self.mode.rank):          # each process its own dropout masks (tensor/random.py)
            loss, state = self.mode.forward_backward(inputs, targets, self.state, backward_scale=scale)
        clip = self.spec.optim.clip_norm
        with trace.span("clip + optimizer step"):
            grad_norm = self.mode.clip_grad_norm(self.params, clip if clip is not None else math.inf)
            self.step_lr = self.mode.learning_rate(self.optimizer)    # the lr this step uses (for the metrics)
            self.skipped_step = not self._finite_on_every_process(loss, grad_norm)
            if not self.skipped_step:
                self.mode.step(self.optimizer, epoch=self.epoch)
        if self.schedules.step is not None and not self.skipped_step:
            self.schedules.step.step()
        self.state = None if self.skipped_step or not self.data.sequential else state
        self.step += 1
        return loss, grad_norm

    def _finite_on_every_process(self, loss, grad_norm):
        """The same answer on every process: the gradient norm is already global, the loss is this process's.
        A skipped step keeps `_skip_report` for the log."""
        mean_loss, = self.mode.reduce([loss], "mean")
        finite = math.isfinite(mean_loss) and math.isfinite(grad_norm)
        self._skip_report = None if finite else f"loss {mean_loss:g}, gradient norm {grad_norm:g}"
        return finite

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self):
        """Train until `epochs` or `max_steps`, evaluate, write the final checkpoint; returns self.evals.

        Raises TrainingInterrupted after a requested stop (the checkpoint is written first). Nothing is written
        into out_dir before mode.start() returns (a parameter-server worker has then joined its servers). This
        process trains from here on, so glibc keeps its freed memory for the next step (host_allocator,
        process-wide).
        """
        retain_freed_memory()      # each step's big arrays reused instead of faulted in again
        try:
            self._announce()
            if not self._resumed:
                self._check_new_run()          # refused at once, not after the mode's start (a worker's wait)
            self.mode.start(self.epoch)
            self._open_outputs()               # after the start: a mode that cannot start leaves out_dir as it was
            self.model.train()
            self._tick = time.perf_counter()
            self._train()
            self.mode.finish()
            self._finish()
        finally:
            self._close_outputs()
        return self.evals

    def _train(self):
        while not self.trained_all():
            for inputs, targets in self.train_iter:       # continues from the cursor after a resume
                loss, grad_norm = self._metered_step(inputs, targets)
                self._accumulate(loss, targets.size, grad_norm)
                self._check_skipped_step()
                self._after_step()
                if self.mode.agree(self._stop_signal is not None):    # all processes stop after one step
                    self._stop_signal = self._stop_signal or "a stop request on another process"
                    self.save_checkpoint()
                    self._plot()
                    raise TrainingInterrupted(self._stop_signal, self.step)
                if self._reached_max_steps():
                    return
            self._end_epoch()

    def _metered_step(self, inputs, targets):
        """train_step; the step that ends a log interval runs under a MemoryMeter for `peak_mem_bytes`
        (peak array bytes the step allocated: activations, gradients, temporaries).

        Metering one step per interval (not all) keeps the meter's bookkeeping off the other steps;
        a step's peak is the same every step of a fixed-shape job.
        """
        if (self.step + 1) % self.spec.train.log_every and self.step != 0:   # the first step checks the budget
            return self.train_step(inputs, targets)
        with MemoryMeter(self.mode.device, resident=self._resident_tensors(),
                         buffers=self.mode.resident_buffers()) as meter:
            result = self.train_step(inputs, targets)
        whole = self._record_measured_peak(meter.peak_bytes + self.optimizer.state_nbytes())
        needed = self._acc["peak_mem_bytes"] = meter.peak_bytes - meter.start_bytes  # beyond the parameters
        budget = self.spec.memory.budget_mb                                           # and state already held
        if self.checkpoint_choice is not None and not self._reported_measured_peak:
            self._reported_measured_peak = True
            choice = self.checkpoint_choice        # (the whole figures also hold what the plan counted as held)
            self._say(f"activation checkpointing: step {self.step} measured peak {needed / 2**20:.2f} MiB "
                      f"({whole / 2**20:.2f} MiB in all), predicted {choice.peak / 2**20:.2f} MiB "
                      f"({(choice.held + choice.peak) / 2**20:.2f} MiB in all)")
        if budget is not None and whole > budget * 2**20:    # every process sees the same `whole`: all stop
            raise MemoryBudgetExceeded(
                f"step {self.step} peaked at {whole / 2**20:.1f} MiB of array memory in a process (parameters, "
                f"gradients and optimizer state included), over [memory] budget_mb = {budget:g} "
                f"(activation_checkpointing = {self.spec.memory.activation_checkpointing!r}); "
                'try activation_checkpointing = "auto" or "sqrt", a smaller bptt or a smaller batch')
        return result

    def _record_measured_peak(self, peak):
        """measured_peak_bytes: the meter's absolute peak plus the optimizer's state arrays (which it does not
        see), the largest over the data shares' processes and the metered steps so far; the main process
        rewrites memory.json when it grows. Every process calls this at the same steps (a reduction). Returns
        this step's figure, the largest process's."""
        slots = [0.0] * self.mode.world_size            # one slot per share: the sum is every process's figure
        slots[self.mode.train_share().index] = float(peak)
        peak = int(max(self.mode.reduce(slots, "sum")))
        if self.measured_peak_bytes is None or peak > self.measured_peak_bytes:
            self.measured_peak_bytes = peak
            self._write_memory_json()
        return peak

    def _write_memory_json(self):
        if self.out_dir is not None and self.mode.is_main and self.memory_estimate is not None:
            with self.outputs.optional(memory_plan.MEMORY_FILE):
                memory_plan.write_memory_json(self.out_dir, self.memory_estimate, self.measured_peak_bytes)

    def _resident_tensors(self):
        """The tensors a step starts with: parameters and buffers, their gradients, the carried state."""
        resident = list(self.model.state_dict(keep_vars=True).values())
        resident += [p.grad for p in self.params if p.grad is not None]
        return resident + protocol.state_tensors(self.state)

    def _check_skipped_step(self):
        """[train] on_nonfinite after a step whose update train_step dropped: "skip" logs it and goes on, until
        MAX_SKIPS_IN_A_ROW in a row; "stop" ends the run. Stopping logs and plots what came before, writes no
        checkpoint (the last one written is the last good one) and raises TrainingDiverged on every process."""
        if not self.skipped_step:
            self._skips_in_a_row = 0
            return
        self._skips_in_a_row += 1
        policy = self.spec.train.on_nonfinite
        if policy == "skip" and self._skips_in_a_row < MAX_SKIPS_IN_A_ROW:
            self._say(f"step {self.step}: {self._skip_report}: update skipped ([train] on_nonfinite = \"skip\", "
                      f"{self._skips_in_a_row} in a row)")
            return
        why = ('stopped ([train] on_nonfinite = "stop")' if policy == "stop" else
               f'stopped after {MAX_SKIPS_IN_A_ROW} skipped steps in a row ([train] on_nonfinite = "skip")')
        self._log_train()
        self._plot()
        raise TrainingDiverged(self.step, f"{self._skip_report}: not finite; {why}", self.last_checkpoint)

    def _say(self, line):
        if self.progress is not None:
            self.progress.message(line)

    def _reached_max_steps(self):
        return self.spec.train.max_steps is not None and self.step >= self.spec.train.max_steps

    def trained_all(self):
        """True when every step the job asks for ([train] epochs, max_steps) is done: fit() trains no more."""
        return self.epoch >= self.spec.train.epochs or self._reached_max_steps()

    def resume_point(self):
        """Where a restored run goes on, in words: "at step S (epoch E)", or, when it has trained every step the
        job asks for, that fit() trains nothing: a finished run only reports its results (and writes its final
        checkpoint and curves again); one stopped after its last step also runs its final evaluation."""
        if not self.trained_all():
            return f"at step {self.step} (epoch {self.epoch + 1})"
        t = self.spec.train
        asked = (f"max_steps = {t.max_steps}" if self._reached_max_steps() else
                 f"{t.epochs} epoch{'s' if t.epochs != 1 else ''}")
        then = ("it only reports its results (and writes its final checkpoint and curves again)" if self.finished
                else "it only finishes the run: its final evaluation, checkpoint and results")
        return (f"at step {self.step}, where the run has already trained its {asked}: nothing is left to train, so "
                f"{then} (raise [train] epochs or max_steps to train further)")

    def _after_step(self):
        t = self.spec.train
        if self.progress is not None:
            self.progress.advance()
        for line in self.mode.messages():
            self._say(line)
        if self.step % t.log_every == 0:
            self._log_train()
        best = evaluated = False
        if t.eval_every != "epoch" and self.step % t.eval_every == 0:
            evaluated = True
            best = self._new_best(self._evaluate_and_log("valid"))
        if best or (t.checkpoint_every and self.step % t.checkpoint_every == 0):
            self.save_checkpoint()
        if evaluated:                      # after the checkpoint: the curves are not worth a step of training
            self._plot()

    def _end_epoch(self):
        self.epoch += 1
        self.state = None                  # every epoch starts from the zero state
        if self.schedules.epoch is not None:
            self.schedules.epoch.step()
        if self.spec.train.eval_every == "epoch":
            if self._new_best(self._evaluate_and_log("valid")):
                self.save_checkpoint()
            self._plot()

    def _new_best(self, result):
        """With [train] keep_best: True when `result` (a valid EvalResult) is the lowest loss so far, so that a
        checkpoint of these weights is written and kept."""
        if result is None or not self.spec.train.keep_best or not math.isfinite(result.loss):
            return False
        if self._best_valid is not None and result.loss >= self._best_valid:
            return False
        self._best_valid = result.loss
        return True

    def _finish(self):
        if self._acc["steps"] or self._acc["skipped"]:
            self._log_train()
        for split in self.data.eval_splits:
            if self.evals.get(split) is None or self.evals[split].step != self.step:
                self._evaluate_and_log(split)
        self.finished = True
        self.save_checkpoint()
        self._plot()

    def request_stop(self, signal_name="SIGINT"):
        """Ask the loop to checkpoint and stop after the current step (safe to call from a signal handler)."""
        self._stop_signal = signal_name

    @property
    def stop_requested(self):
        return self._stop_signal is not None

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, split):
        """Target-weighted mean loss over the whole split, under no_grad in eval mode -> EvalResult (NaN on a
        process that does not evaluate)."""
        with trace.phase(f"eval {split}"):            # labels its spans in traces and watchdog messages
            return self._evaluate(split)

    def _evaluate(self, split):
        share = self.mode.eval_share()
        if share is None:
            return EvalResult(split, math.nan, 0, self.step)
        was_training = self.model.training
        self.model.eval()
        start = time.perf_counter()
        total, count, state = 0.0, 0, None
        try:
            with dt.no_grad():
                for inputs, targets in self.data.eval_batches(split, share):
                    loss, state = self.mode.forward_only(inputs, targets, state if self.data.sequential else None)
                    total += loss * targets.size
                    count += targets.size
        finally:
            self.model.train(was_training)
        total, count = self.mode.reduce([total, count], "sum")
        return EvalResult(split, total / count if count else math.nan, int(count), self.step,
                          time.perf_counter() - start)

    def _evaluate_and_log(self, split):
        if split not in self.data.eval_splits:
            return None
        start = time.perf_counter()
        result = self._evaluate_logged(split)
        if self._tick is not None:            # train throughput counts training time only
            self._tick += time.perf_counter() - start
        return result

    def _evaluate_logged(self, split):
        result = self.evaluate(split)
        self.evals[split] = result
        row = {"step": self.step, "epoch": self._epoch_label(), "split": split, "loss": result.loss,
               **self._loss_figures(result.loss), self._rate_key(): result.tokens / max(result.seconds, 1e-9),
               "tokens": result.tokens, "time": self.elapsed()}
        self._write(row)
        if self.progress is not None:
            self.progress.eval_row(row)
        return result

    # ------------------------------------------------------------------------------------------ metrics
    def _loss_figures(self, loss):
        """Perplexity (and bits per character) of a loss, for language data."""
        figures = {}
        if self.data.language:
            figures["ppl"] = perplexity(loss)
        if getattr(self.data, "char_level", False):
            figures["bpc"] = loss / LN2
        return figures

    def _rate_key(self):
        return f"{self.data.unit}_per_s"

    def _accumulate(self, loss, targets, grad_norm):
        acc = self._acc
        if self.skipped_step:          # a dropped update: its non-finite numbers stay out of the means
            acc["skipped"] += 1
            return
        acc["loss_sum"] += loss * targets
        acc["tokens"] += targets
        acc["grad_norm_sum"] += grad_norm
        acc["steps"] += 1

    def _log_train(self):
        acc, now = self._acc, time.perf_counter()
        seconds = acc["seconds"] + (now - self._tick)
        # every process logs at the same steps: the mean over processes is the global batch's loss
        # (NaN when every step of the interval was skipped; written as null)
        loss, = self.mode.reduce([acc["loss_sum"] / acc["tokens"] if acc["tokens"] else math.nan], "mean")
        targets = acc["tokens"] * self.mode.world_size
        row = {"step": self.step, "epoch": self._epoch_label(), "split": "train", "loss": loss,
               **self._loss_figures(loss), self._rate_key(): targets / max(seconds, 1e-9),
               "lr": self.step_lr, "grad_norm": acc["grad_norm_sum"] / acc["steps"] if acc["steps"] else math.nan}
        if acc["skipped"]:
            row["skipped_steps"] = acc["skipped"]
        if "peak_mem_bytes" in acc:
            row["peak_mem_bytes"] = acc["peak_mem_bytes"]
        row["time"] = self.elapsed()
        self._write(row)
        if self.progress is not None:
            self.progress.train_row(row)
        self._acc = _fresh_accumulators()
        self._tick = now

    def _epoch_label(self):
        """The 1-based epoch a step belongs to (after an epoch ends: the epoch just completed)."""
        return epoch_label(self.epoch, self.train_iter.position)

    def elapsed(self):
        """Seconds spent in fit() so far, summed over resumed runs."""
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self._elapsed_before + running

    def _write(self, row):
        if self.metrics is not None:
            with self.outputs.needed(self.out_dir / METRICS_FILE):
                self.metrics.write(row)

    def _plot(self):
        if self.out_dir is not None and self.mode.is_main and self.metrics is not None:
            name = Path(self.spec.source).stem if self.spec.source else "job"
            what = "perplexity" if self.data.language else "loss"
            with self.outputs.optional(CURVES_FILE):
                plot_curves(self.metrics.rows, self.out_dir / CURVES_FILE, title=f"{name}: {what}")

    def _announce(self):
        """Start the clock and (main process) the progress report; say the memory estimate and the checkpointing."""
        self._started = time.perf_counter()
        if self.progress is None and self.mode.is_main:     # one process reports
            self.progress = Progress(self.total_steps, initial=self.step, bar=self._progress_mode)
        if self.memory_estimate is not None:
            for line in self.memory_estimate.lines(f"memory per process ({self.mode.memory_holding().description}):"):
                self._say(line)
        if self.checkpoint_choice is not None:
            self._say(f"activation checkpointing for [memory] budget_mb = {self.spec.memory.budget_mb:g}: "
                      f"{self.checkpoint_choice.describe()}")

    def _check_new_run(self):
        """Refuse to write a new run over an earlier one, unless overwrite: the main process over out_dir's run
        (check_new_run), another over its own checkpoints (a parameter-server worker's)."""
        if self.out_dir is None or self.overwrite:
            return
        if self.mode.is_main:
            check_new_run(self.out_dir)
            return
        own = self.mode.checkpoint_dir(self.out_dir)
        if own is not None:
            saving.check_no_checkpoints(own)

    def _open_outputs(self):
        """A new run first deletes what an earlier one left (this process's checkpoints; the main process's curves);
        then the main process writes config.toml, metrics.jsonl (rewritten from the start) and memory.json."""
        if self.out_dir is None:
            return
        own = self.mode.checkpoint_dir(self.out_dir)
        if not self._resumed and own is not None:
            saving.remove_checkpoints(own)
        if not self.mode.is_main:
            return
        with self.outputs.needed(self.out_dir):
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.outputs.opened()
            if not self._resumed:
                (self.out_dir / CURVES_FILE).unlink(missing_ok=True)
            (self.out_dir / CONFIG_FILE).write_text(self._config_toml(), encoding="utf-8")
            self.metrics = MetricsWriter(self.out_dir / METRICS_FILE, resume_at=self._metrics_position)
        self._write_memory_json()

    def _config_toml(self):
        """The job as config.toml: all of it from a job file; else only the settings applied to the objects given."""
        if self._spec_describes_all:
            return self.spec.to_toml()
        return self.spec.to_toml(only=APPLIED_SETTINGS, note="the model, data and optimizer were Python objects "
                                 "(not described here); these are the settings the Trainer applied")

    def _close_outputs(self):
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    # ------------------------------------------------------------------------------------------ checkpoints
    def run_state(self):
        """This process's RunState: its model's arrays, its optimizer's state, its carried state."""
        model = {name: t.numpy() for name, t in self.model.state_dict().items()}
        return RunState(model, self.optimizer.state_dict(), self.state)

    def checkpoint_contents(self, whole):
        """(model arrays, other arrays, JSON metadata) of a checkpoint of `whole` (a whole-model RunState) and
        this process's loop state."""
        arrays, optim_json = saving.split_optimizer_state(whole.optimizer)
        arrays.update(protocol.state_to_arrays(whole.carried))
        acc = dict(self._acc)
        acc["seconds"] += time.perf_counter() - self._tick if self._tick is not None else 0.0
        meta = {
            "step": self.step,
            "epoch": self.epoch,
            "finished": self.finished,
            "step_lr": self.step_lr,
            "data": self.train_iter.state_dict(),
            "optimizer": optim_json,
            "schedules": self.schedules.state_dict(),
            "rng": dt.get_rng_state(),
            "metrics": {"position": self._synced_metrics_position(),
                        "rows": len(self.metrics.rows) if self.metrics is not None else None,
                        "accumulators": acc},
            "evals": {split: r.to_dict() for split, r in self.evals.items() if r.tokens},
            "best_valid_loss": self._best_valid,
            "skips_in_a_row": self._skips_in_a_row,
            "elapsed": self.elapsed(),
            "vocab_size": getattr(self.data, "vocab_size", None),
            "job": self.spec.to_dict(),
            "job_source": self.spec.source,
            "mode": self.mode.checkpoint_record(),
        }
        return whole.model, arrays, meta

    def _synced_metrics_position(self):
        """metrics.jsonl's length, once durable: a checkpoint that outlives a power loss finds its rows there."""
        if self.metrics is None:
            return None
        with self.outputs.needed(self.out_dir / METRICS_FILE):
            return self.metrics.sync()

    def save_checkpoint(self):
        """Write a checkpoint of this step atomically into this process's checkpoint directory (the main
        process: out_dir/checkpoints/), keeping the job's keep_checkpoints (and keep_best) ones; returns its path
        or None.

        Raises TrainingDiverged on every process, writing nothing, when some process's weights, optimizer
        buffers, carried state or last evaluation hold NaN or an infinity.
        """
        if self.out_dir is None:
            return None
        self._check_finite_state()
        whole = self.mode.gather(self.run_state())        # a collective: every process takes part
        directory = self.mode.checkpoint_dir(self.out_dir)
        if whole is None or directory is None:
            return None
        if self.metrics is not None:
            self.outputs.check_in_place(self.metrics, self.step)
        with self.outputs.needed(directory / saving.DIRNAME):
            path = saving.save_checkpoint(directory, *self.checkpoint_contents(whole),
                                          keep=self.spec.train.keep_checkpoints, keep_best=self.spec.train.keep_best)
        if self.mode.is_main:
            self.last_checkpoint = path
        return path

    def _check_finite_state(self):
        """Every process checks its own part of what a checkpoint holds; all raise if any found NaN or inf."""
        local = self.run_state()
        optimizer_arrays, _ = saving.split_optimizer_state(local.optimizer)
        carried = protocol.state_to_arrays(local.carried)
        evals = {f"{split} loss": r.loss for split, r in self.evals.items() if r.tokens}
        bad = (saving.first_nonfinite(local.model, "weight")
               or saving.first_nonfinite(optimizer_arrays, "optimizer buffer")
               or saving.first_nonfinite(carried, "carried state") or saving.first_nonfinite(evals, "the"))
        if self.mode.agree(bad is not None):
            what = f"{bad[0]} is {bad[1]}" if bad else "another process's weights or state are not finite"
            raise TrainingDiverged(self.step, f"{what}; not writing a checkpoint", self.last_checkpoint)

    def restore(self, checkpoint):
        """Load a Checkpoint (from load_checkpoint) so that fit() continues exactly where it was written.

        Raises CheckpointError when it does not fit this job (another model or data, other shapes).
        """
        meta, where = checkpoint.meta, checkpoint.path
        changes = resume_changes(meta["job"], self.spec.to_dict(), where)
        self._check_data(meta, where)
        whole = RunState(checkpoint.model, saving.join_optimizer_state(checkpoint.arrays, meta["optimizer"]),
                         protocol.state_from_arrays(checkpoint.arrays, device=self.mode.device))
        try:
            local = self.mode.scatter(whole)
            self._load_model(local.model, checkpoint)
            self.optimizer.load_state_dict(local.optimizer)
            self.schedules.load_state_dict(meta["schedules"])
            self.train_iter.load_state_dict(meta["data"])
        except (ValueError, KeyError) as exc:
            raise saving.CheckpointError(f"{where}: does not fit this job: {exc}") from None
        self.state = local.carried
        dt.set_rng_state(meta["rng"])
        self.step, self.epoch, self.finished = meta["step"], meta["epoch"], meta.get("finished", False)
        self.step_lr = meta.get("step_lr", self.step_lr)
        self.evals = {split: EvalResult(**r) for split, r in meta.get("evals", {}).items()}
        self._acc = {**_fresh_accumulators(), **meta["metrics"]["accumulators"]}
        self._metrics_position = meta["metrics"]["position"]
        missing = self._missing_metrics(meta)
        self._elapsed_before = meta.get("elapsed", 0.0)
        self._best_valid = meta.get("best_valid_loss")
        self._skips_in_a_row = meta.get("skips_in_a_row", 0)
        self._resumed = True
        self.last_checkpoint = where
        self.resume_changes = [self._apply_change(*change) for change in changes] + ([missing] if missing else [])

    def _missing_metrics(self, meta):
        """The line saying which rows the checkpoint's metrics.jsonl lacks (a power loss, a file cut by hand), or
        None; the rows there are kept and the run goes on (the checkpoint itself is whole)."""
        position = meta["metrics"]["position"]
        if self.out_dir is None or not self.mode.is_main or position is None:
            return None
        lack = shortfall(self.out_dir / METRICS_FILE, position, meta["metrics"].get("rows"))
        if lack is None:
            return None
        rows = f"{lack.missing_rows} row(s), " if lack.missing_rows is not None else ""
        return (f"{self.out_dir / METRICS_FILE} lacks {rows}{lack.missing_bytes} bytes that the checkpoint of step "
                f"{meta['step']} recorded (lost before they reached the disk, or cut); keeping its {lack.kept_rows} "
                f"complete row(s) and going on; nothing else is lost")

    def _apply_change(self, section, key, saved, wanted):
        """Apply one job change a resumed run may make (train/resume.py); returns the line that reports it."""
        line = f"resumed with [{section}] {key} = {wanted!r} (the checkpoint's job: {saved!r})"
        if (section, key) == ("optim", "lr"):
            before, after = apply_lr_change(self.optimizer, self.schedules, saved, wanted)
            line += f"; the lr in use goes from {before:.6g} to {after:.6g}"
        return line     # every other resumable key is read from the job when it is used

    def load_weights(self, checkpoint):
        """Load only the model weights of a Checkpoint (all evaluation needs), after checking that it was
        written for this job's model and data (other sections, e.g. [optim] or [train], may differ)."""
        self._check_data(checkpoint.meta, checkpoint.path)
        whole = RunState(checkpoint.model, {}, None)
        self._load_model(self.mode.scatter(whole).model, checkpoint)

    def _check_data(self, meta, where):
        check_same_model(meta["job"], self.spec.to_dict(), where)
        vocab = getattr(self.data, "vocab_size", None)
        if meta.get("vocab_size") not in (None, vocab):
            raise saving.CheckpointError(f"{where}: saved with a vocabulary of {meta['vocab_size']} entries, this "
                                         f"job's corpus has {vocab}; is it the same data?")

    def _load_model(self, arrays, checkpoint):
        try:
            self.model.load_state_dict(arrays)
        except RuntimeError as exc:
            raise saving.CheckpointError(f"{checkpoint.path / saving.MODEL_FILE}: does not fit this job's model: "
                                         f"{exc}") from None


def check_new_run(out_dir):
    """Raise RunExistsError when out_dir holds an earlier run: its checkpoints, or (a run stopped before its first
    checkpoint) its metrics.jsonl. A new run would replace them."""
    saving.check_no_checkpoints(out_dir)
    metrics = Path(out_dir) / METRICS_FILE
    if metrics.exists():
        raise saving.RunExistsError(f"{out_dir} holds an earlier run's {METRICS_FILE} but no checkpoint to resume "
                                    f"from: start over with --overwrite (deletes it and {CURVES_FILE}), or choose "
                                    f"another --out")


def epoch_label(epochs_done, position):
    """The 1-based epoch of the step taken last, from the epochs completed and the data cursor (back at 0
    once an epoch ends): what logs, metrics and `disttrain eval` call it."""
    return epochs_done + 1 if 0 < position or epochs_done == 0 else epochs_done


def _fresh_accumulators():
    return {"loss_sum": 0.0, "tokens": 0, "grad_norm_sum": 0.0, "steps": 0, "skipped": 0, "seconds": 0.0}


