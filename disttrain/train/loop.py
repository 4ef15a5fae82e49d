"""Trainer: the one training loop every mode uses, for LSTM language models with truncated BPTT.

    trainer = Trainer(spec, out_dir="runs/charlm")
    trainer.restore(load_checkpoint("runs/charlm"))     # only when resuming
    results = trainer.fit()                             # {"valid": EvalResult, "test": EvalResult}

One step (`train_step`), in this order, so that distributed modes change only the marked hook:
    forward over a (T, B) segment from the carried state -> loss = cross-entropy mean over the T*B tokens
    -> backward -> strategy.sync_gradients (data parallel: allreduce) -> clip the global grad norm
    -> optimizer step -> per-step LR schedule (warm-up) -> carry (h.detach(), c.detach()) to the next segment.
When the loss (averaged over processes) or the gradient norm is NaN or infinite, no process takes the optimizer
step or the schedule step and the state restarts from zeros; [train] on_nonfinite then stops the run
(TrainingDiverged) or goes on ("skip", at most MAX_SKIPS_IN_A_ROW skipped steps in a row).

Truncated BPTT: the train split is cut into B parallel streams (`batchify`) walked in segments of `bptt` rows
(`TBPTTIterator`); the LSTM state flows across segments but gradients stop at segment borders, and the state is
reset to zeros at the start of every epoch. The per-epoch LR schedule is stepped after each epoch.

Evaluation (`evaluate`) runs under no_grad with model.eval() (no dropout) over EVAL_BATCH_SIZE = 10 streams of
the split (the convention of PyTorch's word_language_model example; fewer when the split is tiny), segments of
the training `bptt`, state carried from zeros. Perplexity is exp of the token-weighted mean loss over every
evaluated token (not an average of per-segment perplexities); with several processes each evaluates its share
of the streams (`strategy.shard_eval`) and the loss sums and token counts are added up (`strategy.reduce_sum`),
so every process gets the one-process figure. Character-level jobs also report bits per
character, loss / ln 2. Validation runs every `eval_every` steps or after every epoch, and once more at the end
(unless it just ran) followed by the test split.

NOTE (exact resume): everything a step depends on is in the job checkpoint — weights, optimizer buffers and
scalars, LR schedules, the data cursor, the carried LSTM state, the RNG state and the metrics accumulators — and
evaluation consumes no randomness and touches no training state. A run resumed from the checkpoint of step k
therefore computes bit-for-bit the same steps k+1, k+2, ... as one that was never stopped (same device, same
float dtype, same BLAS).
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path

import disttrain as dt
from disttrain.data import TBPTTIterator, batchify
from disttrain.nn import functional as F
from disttrain import trace
from disttrain.train import checkpoint as ckpt
from disttrain.train.build import (build_corpus, build_model, build_optimizer, build_schedules,
                                   is_char_level)
from disttrain.train.metrics import LN2, MetricsWriter, perplexity, plot_curves
from disttrain.train.progress import Progress
from disttrain.train.resume import apply_lr_change, check_same_model, resume_changes
from disttrain.tensor.memory import MemoryMeter
from disttrain.train.strategy import LocalStrategy

__all__ = ["Trainer", "EvalResult", "TrainingInterrupted", "TrainingDiverged", "check_new_run", "EVAL_BATCH_SIZE",
           "epoch_label"]

EVAL_BATCH_SIZE = 10
MAX_SKIPS_IN_A_ROW = 10        # [train] on_nonfinite = "skip" stops the run after this many skipped steps in a row
METRICS_FILE, CONFIG_FILE, CURVES_FILE = "metrics.jsonl", "config.toml", "curves.png"


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
    loss: float          # mean cross-entropy per token (nats)
    tokens: int
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
    """Trains the job `spec` (a JobSpec); writes metrics, curves, config and checkpoints into `out_dir`.

    Construction seeds the global RNG with [train] seed, then builds corpus, model, optimizer and schedules.
    out_dir=None keeps everything in memory (no files). corpus: a prebuilt Corpus (default: the job's).
    progress: True/False forces a tqdm bar on/off; None picks one when stdout is a terminal.
    overwrite: a new (not restored) run may replace an earlier run's checkpoints, metrics and curves in out_dir;
    without it, fit() raises RunExistsError when out_dir holds checkpoints.
    """

    def __init__(self, spec, out_dir=None, corpus=None, strategy=None, progress=None, overwrite=False):
        self.spec = spec
        self.strategy = strategy or LocalStrategy()
        self.device = spec.train.device
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.char_level = is_char_level(spec)
        self._progress_mode = progress
        self.overwrite = overwrite

        dt.manual_seed(spec.train.seed)
        self.corpus = corpus if corpus is not None else build_corpus(spec)
        self.model = self.strategy.prepare_model(build_model(spec, len(self.corpus.vocab)).to(self.device))
        self.params = list(self.model.parameters())
        self.optimizer = build_optimizer(spec, self.params)
        self.schedules = build_schedules(spec, self.optimizer)
        streams = self.strategy.shard(batchify(self.corpus.train, spec.data.batch_size))
        self.train_iter = TBPTTIterator(streams, spec.data.bptt)

        self.step = 0                 # optimizer steps taken
        self.epoch = 0                # epochs completed
        self.hidden = None            # (h, c) carried into the next segment; None = zeros
        self.evals = {}               # split -> last EvalResult
        self.finished = False
        self.step_lr = self.optimizer.param_groups[0]["lr"]
        self._acc = _fresh_accumulators()
        self._elapsed_before = 0.0    # training seconds of earlier (resumed-from) processes
        self._metrics_position = None  # where to continue metrics.jsonl when resuming
        self._resumed = False
        self.resume_changes = []      # lines saying what a restore changed (the lr, the step budget, ...)
        self.last_checkpoint = None   # the newest checkpoint written or restored (main process)
        self.skipped_step = False     # the last step's update was dropped: its loss or gradient norm was not finite
        self._skips_in_a_row = 0
        self._skip_report = None      # "loss nan, gradient norm 3.2" of the last dropped step
        self._best_valid = None       # the lowest valid loss so far (for [train] keep_best)
        self._stop_signal = None
        self._started = self._tick = None   # perf_counter at fit() start / at the last train log
        self.metrics = None
        self.progress = None

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self, inputs, targets):
        """One TBPTT segment: inputs, targets np.int64 (T, B). Returns (mean loss, grad norm before clipping)."""
        trace.set_step(self.step + 1)              # names this step in traces and watchdog messages
        # 1-2. forward from the carried state, loss, backward (a pipeline strategy runs them through its stages)
        self.optimizer.zero_grad()
        loss, hidden = self.strategy.forward_backward(self, inputs, targets)
        # 3. gradient synchronisation across processes (a no-op in local mode)
        self.strategy.sync_gradients(self.params)
        # 4. clip the global gradient norm (max_norm = inf only measures it)
        clip = self.spec.optim.clip_norm
        with trace.span("clip + optimizer step"):
            grad_norm = self.strategy.clip_grad_norm(self.params, clip if clip is not None else math.inf)
            # 5. update, then the per-step LR schedule, unless the loss or the norm is not finite on some process
            self.step_lr = self.optimizer.param_groups[0]["lr"]       # the lr this step uses (for the metrics)
            self.skipped_step = not self._finite_on_every_process(loss, grad_norm)
            if not self.skipped_step:
                self.optimizer.step()
        if self.schedules.step is not None and not self.skipped_step:
            self.schedules.step.step()
        # 6. carry the state into the next segment, cut from this segment's graph (a dropped step: from zeros)
        self.hidden = None if self.skipped_step else hidden
        self.step += 1
        return loss, grad_norm

    def _finite_on_every_process(self, loss, grad_norm):
        """The same answer on every process: the gradient norm is already global, the loss is this process's.
        A skipped step keeps `_skip_report` for the log."""
        mean_loss = self.strategy.reduce_mean(loss)
        finite = math.isfinite(mean_loss) and math.isfinite(grad_norm)
        self._skip_report = None if finite else f"loss {mean_loss:g}, gradient norm {grad_norm:g}"
        return finite

    def forward_backward(self, inputs, targets):
        """Forward from the carried state, loss = cross-entropy mean over the T*B tokens, backward (of the
        per-sequence loss when the job asks for Zaremba's convention; the returned loss stays per token).
        The forward runs in checkpointed time segments when [memory] activation_checkpointing asks for them
        (`forward_loss`). Returns (loss as a float, the detached (h, c) to carry)."""
        x = dt.tensor(inputs, device=self.device)
        y = dt.tensor(targets, device=self.device)
        with trace.span("forward"):
            loss, (h, c) = self.model.forward_loss(x, y, self.hidden)
        with trace.span("backward"):
            (loss * inputs.shape[0] if self.spec.optim.loss == "sum_over_time" else loss).backward()
        return loss.item(), (h.detach(), c.detach())

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self):
        """Train until `epochs` or `max_steps`, evaluate, write the final checkpoint; returns self.evals.

        Raises TrainingInterrupted after a requested stop (the checkpoint is written first).
        """
        self._open_outputs()
        try:
            self.model.train()
            self._tick = time.perf_counter()
            self._train()
            self._finish()
        finally:
            self._close_outputs()
        return self.evals

    def _train(self):
        max_steps = self.spec.train.max_steps
        while self.epoch < self.spec.train.epochs and not self._reached(max_steps):
            for inputs, targets in self.train_iter:       # continues from the cursor after a resume
                loss, grad_norm = self._metered_step(inputs, targets)
                self._accumulate(loss, inputs.size, grad_norm)
                self._check_skipped_step()
                self._after_step()
                if self.strategy.any(self._stop_signal is not None):    # all processes stop after one step
                    self._stop_signal = self._stop_signal or "a stop request on another process"
                    self.save_checkpoint()
                    self._plot()
                    raise TrainingInterrupted(self._stop_signal, self.step)
                if self._reached(max_steps):
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
        with MemoryMeter(self.device, resident=self._resident_tensors()) as meter:
            result = self.train_step(inputs, targets)
        needed = self._acc["peak_mem_bytes"] = meter.peak_bytes - meter.start_bytes  # beyond the parameters
        budget = self.spec.memory.budget_mb                                           # and state already held
        if budget is not None and needed > budget * 2**20:
            raise MemoryBudgetExceeded(
                f"step {self.step} needed {needed / 2**20:.1f} MiB of array memory, over [memory] budget_mb = "
                f"{budget:g} (activation_checkpointing = {self.spec.memory.activation_checkpointing!r}); "
                'try activation_checkpointing = "sqrt", a smaller bptt or a smaller batch')
        return result

    def _resident_tensors(self):
        """The tensors a step starts with: parameters and buffers, their gradients, the carried state."""
        resident = list(self.model.state_dict(keep_vars=True).values())
        resident += [p.grad for p in self.params if p.grad is not None]
        return resident + _tensors_in(self.hidden)

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
        why = (f'stopped ([train] on_nonfinite = "stop")' if policy == "stop" else
               f'stopped after {MAX_SKIPS_IN_A_ROW} skipped steps in a row ([train] on_nonfinite = "skip")')
        self._log_train()
        self._plot()
        raise TrainingDiverged(self.step, f"{self._skip_report}: not finite; {why}", self.last_checkpoint)

    def _say(self, line):
        if self.progress is not None:
            self.progress.message(line)

    def _reached(self, max_steps):
        return max_steps is not None and self.step >= max_steps

    def _after_step(self):
        t = self.spec.train
        if self.progress is not None:
            self.progress.advance()
        for line in self.strategy.messages():
            if self.progress is not None:
                self.progress.message(line)
        if self.step % t.log_every == 0:
            self._log_train()
        best = False
        if t.eval_every != "epoch" and self.step % t.eval_every == 0:
            best = self._new_best(self._evaluate_and_log("valid"))
        if best or (t.checkpoint_every and self.step % t.checkpoint_every == 0):
            self.save_checkpoint()

    def _end_epoch(self):
        self.epoch += 1
        self.hidden = None                 # every epoch starts from the zero state
        if self.schedules.epoch is not None:
            self.schedules.epoch.step()
        if self.spec.train.eval_every == "epoch" and self._new_best(self._evaluate_and_log("valid")):
            self.save_checkpoint()

    def _new_best(self, result):
        """With [train] keep_best: True when `result` (a valid EvalResult) is the lowest loss so far, so that a
        checkpoint of these weights is written and kept."""
        if not self.spec.train.keep_best or not math.isfinite(result.loss):
            return False
        if self._best_valid is not None and result.loss >= self._best_valid:
            return False
        self._best_valid = result.loss
        return True

    def _finish(self):
        if self._acc["steps"] or self._acc["skipped"]:
            self._log_train()
        if self.evals.get("valid") is None or self.evals["valid"].step != self.step:
            self._evaluate_and_log("valid")
        if self.evals.get("test") is None or self.evals["test"].step != self.step:
            self._evaluate_and_log("test")
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
        """Token-weighted mean loss over the whole split, under no_grad in eval mode -> EvalResult."""
        with trace.phase(f"eval {split}"):            # labels its spans in traces and watchdog messages
            return self._evaluate(split)

    def _evaluate(self, split):
        ids = self.corpus.split(split)
        batch = max(1, min(EVAL_BATCH_SIZE, ids.size // 2))
        streams = self.strategy.shard_eval(batchify(ids, batch))     # data parallel: each rank its columns
        was_training = self.model.training
        self.model.eval()
        start = time.perf_counter()
        total, tokens, hidden = 0.0, 0, None
        try:
            with dt.no_grad():
                for inputs, targets in (TBPTTIterator(streams, self.spec.data.bptt) if streams.shape[1] else ()):
                    loss, hidden = self.strategy.eval_segment(self, inputs, targets, hidden)
                    total += loss * targets.size
                    tokens += targets.size
        finally:
            self.model.train(was_training)
        total, tokens = self.strategy.reduce_sum([total, tokens])
        return EvalResult(split, total / tokens, int(tokens), self.step, time.perf_counter() - start)

    def eval_segment(self, inputs, targets, hidden):
        """(mean loss as a float, state) of one evaluation segment (called under no_grad)."""
        logits, hidden = self.model(dt.tensor(inputs, device=self.device), hidden)
        return F.cross_entropy(logits, dt.tensor(targets.reshape(-1), device=self.device)).item(), hidden

    def _evaluate_and_log(self, split):
        start = time.perf_counter()
        result = self._evaluate_logged(split)
        if self._tick is not None:            # train throughput counts training time only
            self._tick += time.perf_counter() - start
        return result

    def _evaluate_logged(self, split):
        result = self.evaluate(split)
        self.evals[split] = result
        row = {"step": self.step, "epoch": self._epoch_label(), "split": split, "loss": result.loss,
               "ppl": result.ppl, "tokens_per_s": result.tokens / max(result.seconds, 1e-9)}
        if self.char_level:
            row["bpc"] = result.bpc
        row["tokens"] = result.tokens
        row["time"] = self.elapsed()
        self._write(row)
        if self.progress is not None:
            self.progress.eval_row(row)
        if split == "valid":
            self._plot()
        return result

    # ------------------------------------------------------------------------------------------ metrics
    def _accumulate(self, loss, tokens, grad_norm):
        acc = self._acc
        if self.skipped_step:          # a dropped update: its non-finite numbers stay out of the means
            acc["skipped"] += 1
            return
        acc["loss_sum"] += loss * tokens
        acc["tokens"] += tokens
        acc["grad_norm_sum"] += grad_norm
        acc["steps"] += 1

    def _log_train(self):
        acc, now = self._acc, time.perf_counter()
        seconds = acc["seconds"] + (now - self._tick)
        # every process logs at the same steps: the mean over processes is the global batch's loss
        # (NaN when every step of the interval was skipped; written as null)
        loss = self.strategy.reduce_mean(acc["loss_sum"] / acc["tokens"] if acc["tokens"] else math.nan)
        tokens = acc["tokens"] * self.strategy.world_size
        row = {"step": self.step, "epoch": self._epoch_label(), "split": "train", "loss": loss,
               "ppl": perplexity(loss), "tokens_per_s": tokens / max(seconds, 1e-9),
               "lr": self.step_lr, "grad_norm": acc["grad_norm_sum"] / acc["steps"] if acc["steps"] else math.nan}
        if acc["skipped"]:
            row["skipped_steps"] = acc["skipped"]
        if self.char_level:
            row["bpc"] = loss / LN2
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
            self.metrics.write(row)

    def _plot(self):
        if self.out_dir is not None and self.strategy.is_main and self.metrics is not None:
            name = Path(self.spec.source).stem if self.spec.source else "job"
            plot_curves(self.metrics.rows, self.out_dir / CURVES_FILE, title=f"{name}: perplexity")

    def _open_outputs(self):
        self._started = time.perf_counter()
        if self.progress is None and self.strategy.is_main:     # one process reports
            total = self.spec.train.epochs * len(self.train_iter)
            if self.spec.train.max_steps is not None:
                total = min(total, self.spec.train.max_steps)
            self.progress = Progress(total, initial=self.step, bar=self._progress_mode)
        if self.out_dir is None or not self.strategy.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self._resumed:
            self._start_new_run()
        (self.out_dir / CONFIG_FILE).write_text(self.spec.to_toml(), encoding="utf-8")
        self.metrics = MetricsWriter(self.out_dir / METRICS_FILE, resume_at=self._metrics_position)

    def _start_new_run(self):
        """Refuse to write a new run over an earlier one (check_new_run), unless overwrite: then delete that run's
        checkpoints and curves (metrics.jsonl and config.toml are rewritten from the start)."""
        if not self.overwrite:
            check_new_run(self.out_dir)
        ckpt.remove_checkpoints(self.out_dir)
        (self.out_dir / CURVES_FILE).unlink(missing_ok=True)

    def _close_outputs(self):
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    # ------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, hidden=None, model=None, optimizer_state=None):
        """(model arrays, other arrays, JSON metadata) of the current training state; `hidden`: the carried
        (h, c) of all processes' streams (default: this process's); `model`, `optimizer_state`: the whole
        model's (default: this process's model and optimizer)."""
        if model is None:
            model = {name: t.numpy() for name, t in self.model.state_dict().items()}
        arrays, optim_json = ckpt.split_optimizer_state(optimizer_state or self.optimizer.state_dict())
        if hidden is None and self.hidden is not None:
            hidden = tuple(t.numpy() for t in self.hidden)
        if hidden is not None:
            arrays["hidden.h"], arrays["hidden.c"] = hidden
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
            "metrics": {"position": self.metrics.position if self.metrics is not None else None,
                        "accumulators": acc},
            "evals": {split: r.to_dict() for split, r in self.evals.items()},
            "best_valid_loss": self._best_valid,
            "skips_in_a_row": self._skips_in_a_row,
            "elapsed": self.elapsed(),
            "vocab_size": len(self.corpus.vocab),
            "job": self.spec.to_dict(),
            "job_source": self.spec.source,
        }
        return model, arrays, meta

    def save_checkpoint(self):
        """Write a checkpoint of this step into out_dir/checkpoints/ atomically, keeping the job's
        keep_checkpoints (and keep_best) ones (main process only); returns its path or None.

        Raises TrainingDiverged on every process, writing nothing, when some process's weights, optimizer
        buffers, carried state or last evaluation hold NaN or an infinity.
        """
        if self.out_dir is None:
            return None
        self._check_finite_state()
        # the carried state is per process (its B/N streams; pipeline: also per stage, as are the weights and
        # optimizer buffers): every process takes part in gathering it
        hidden, model, optimizer_state = self.strategy.gather_checkpoint(self)
        if not self.strategy.is_main:
            return None
        model, arrays, meta = self.checkpoint_state(hidden, model, optimizer_state)
        self.last_checkpoint = ckpt.save_checkpoint(self.out_dir, model, arrays, meta,
                                                    keep=self.spec.train.keep_checkpoints,
                                                    keep_best=self.spec.train.keep_best)
        return self.last_checkpoint

    def _check_finite_state(self):
        """Every process checks its own part of what a checkpoint holds; all raise if any found NaN or inf."""
        model = {name: t.numpy() for name, t in self.model.state_dict().items()}
        optimizer_arrays, _ = ckpt.split_optimizer_state(self.optimizer.state_dict())
        hidden = {f"hidden {i}": t.numpy() for i, t in enumerate(_tensors_in(self.hidden))}
        evals = {f"{split} loss": r.loss for split, r in self.evals.items()}
        bad = (ckpt.first_nonfinite(model, "weight") or ckpt.first_nonfinite(optimizer_arrays, "optimizer buffer")
               or ckpt.first_nonfinite(hidden, "carried state") or ckpt.first_nonfinite(evals, "the"))
        if self.strategy.any(bad is not None):
            what = f"{bad[0]} is {bad[1]}" if bad else "another process's weights or state are not finite"
            raise TrainingDiverged(self.step, f"{what}; not writing a checkpoint", self.last_checkpoint)

    def restore(self, checkpoint):
        """Load a Checkpoint (from load_checkpoint) so that fit() continues exactly where it was written.

        Raises CheckpointError when it does not fit this job (another model or data, other shapes).
        """
        meta, where = checkpoint.meta, checkpoint.path
        changes = resume_changes(meta["job"], self.spec.to_dict(), where)
        self.load_weights(checkpoint)
        try:
            self.strategy.load_optimizer_state(
                self.optimizer, ckpt.join_optimizer_state(checkpoint.arrays, meta["optimizer"]))
            self.schedules.load_state_dict(meta["schedules"])
            self.train_iter.load_state_dict(meta["data"])
        except (ValueError, KeyError) as exc:
            raise ckpt.CheckpointError(f"{where}: does not fit this job: {exc}") from None
        self.hidden = self.strategy.shard_hidden(self, checkpoint.arrays.get("hidden.h"),
                                                          checkpoint.arrays.get("hidden.c"))
        dt.set_rng_state(meta["rng"])
        self.step, self.epoch, self.finished = meta["step"], meta["epoch"], meta.get("finished", False)
        self.step_lr = meta.get("step_lr", self.step_lr)
        self.evals = {split: EvalResult(**r) for split, r in meta.get("evals", {}).items()}
        self._acc = {**_fresh_accumulators(), **meta["metrics"]["accumulators"]}
        self._metrics_position = meta["metrics"]["position"]
        self._elapsed_before = meta.get("elapsed", 0.0)
        self._best_valid = meta.get("best_valid_loss")
        self._skips_in_a_row = meta.get("skips_in_a_row", 0)
        self._resumed = True
        self.last_checkpoint = where
        self.resume_changes = [self._apply_change(*change) for change in changes]

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
        meta, where = checkpoint.meta, checkpoint.path
        check_same_model(meta["job"], self.spec.to_dict(), where)
        if meta.get("vocab_size") not in (None, len(self.corpus.vocab)):
            raise ckpt.CheckpointError(f"{where}: saved with a vocabulary of {meta['vocab_size']} entries, this "
                                       f"job's corpus has {len(self.corpus.vocab)}; is it the same data?")
        try:
            self.strategy.load_model_state(self.model, checkpoint.model)
        except RuntimeError as exc:
            raise ckpt.CheckpointError(f"{checkpoint.path / ckpt.MODEL_FILE}: does not fit this job's model: "
                                       f"{exc}") from None


def check_new_run(out_dir):
    """Raise RunExistsError when out_dir holds an earlier run: its checkpoints, or (a run stopped before its first
    checkpoint) its metrics.jsonl. A new run would replace them."""
    ckpt.check_new_run(out_dir)
    metrics = Path(out_dir) / METRICS_FILE
    if metrics.exists():
        raise ckpt.RunExistsError(f"{out_dir} holds an earlier run's {METRICS_FILE} but no checkpoint to resume "
                                  f"from: start over with --overwrite (deletes it and {CURVES_FILE}), or choose "
                                  f"another --out")


def epoch_label(epochs_done, position):
    """The 1-based epoch of the step taken last, from the epochs completed and the data cursor (back at 0
    once an epoch ends): what logs, metrics and `disttrain eval` call it."""
    return epochs_done + 1 if 0 < position or epochs_done == 0 else epochs_done


def _fresh_accumulators():
    return {"loss_sum": 0.0, "tokens": 0, "grad_norm_sum": 0.0, "steps": 0, "skipped": 0, "seconds": 0.0}


def _tensors_in(value):
    """The Tensors in a nest of tuples and lists (a carried state: (h, c), or one per pipeline micro-batch)."""
    if isinstance(value, dt.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    return []
