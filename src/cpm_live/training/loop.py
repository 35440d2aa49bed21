"""The one training loop: full fine-tuning, LoRA and QLoRA differ only by options.

Order of setup (each step needs the previous one): engine (process group, device) -> config,
checked identical on every rank -> tokenizer -> model built and its weights loaded (an int4 config
loads a compressed checkpoint or quantizes an fp one) -> LoRA injected, base frozen -> engine.wrap
(shards) -> optimizer over trainable parameters -> data -> resume state.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

import torch

from cpm_live.checkpoint import resume
from cpm_live.checkpoint.adapters import save_adapter, save_cpm_bee_delta
from cpm_live.checkpoint.base_model import load_base
from cpm_live.config import CPMBeeConfig
from cpm_live.data.pack import FinetuneDataset, check_records
from cpm_live.data.tensors import LabelledInputs
from cpm_live.engine import engine_from_args, format_summary, inspect_model
from cpm_live.errors import TrainingError
from cpm_live.lora import add_lora, trainable_parameter_report
from cpm_live.tokenizers import CPMBeeTokenizer
from cpm_live.training.args import FinetuneArgs
from cpm_live.training.loss import token_loss_sum
from cpm_live.training.metrics import MetricsLogger
from cpm_live.training.progress import RunOutcome, StepProgress, eval_bar, summary, timestamp
from cpm_live.training.schedulers import LRSchedule

# Signals that stop a run at the next step boundary, after a checkpoint (Ctrl-C is SIGINT, a scheduler's
# stop SIGTERM); a second one kills at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_SIGNAL_NAMES = {s.name for s in STOP_SIGNALS}
DROPPED_WARN_SHARE = 0.1  # warn once more than this share of the records read is longer than --max-length


class Trainer:
    """``Trainer(args).setup()`` builds everything in dependency order; then :meth:`train`."""

    def __init__(self, args: FinetuneArgs):
        self.args = args
        self.lora = args.lora
        self._stop_requested: str | None = None  # the name of the signal that asked the run to stop
        self._saved_step: int | None = None
        self._last_checkpoint: str | None = None
        self.best_step: int | None = None
        self._last_batch: LabelledInputs | None = None
        self._lock: resume.SaveDirLock | None = None
        self._told_dropped = self._warned_share = False

    def close(self) -> None:
        """Release the save directory and the engine (the process group); safe after a failed setup."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if hasattr(self, "engine"):
            self.engine.close()

    def setup(self) -> Trainer:
        """Engine -> config (same on every rank) -> tokenizer -> model, LoRA, wrap -> optimizer and
        schedule -> data -> resume state -> metrics. Returns ``self``."""
        args = self.args
        self.engine = engine_from_args(args.engine)
        if not args.saving.save:
            self.engine.print_rank0("warning: no --save given: this run keeps nothing (no adapter, no checkpoint); "
                                    "pass --save DIR to keep its results")
        self._lock = self._lock_save_dir()
        # The data before the model: a wrong path or a record without "<ans>" fails in seconds.
        check_records(args.train.dataset, "`dataset`")
        if args.eval.eval_dataset:
            check_records(args.eval.eval_dataset, "`eval_dataset`")
        self.config = self._load_config()
        self.tokenizer = self._load_tokenizer()
        self.model = self._build_model()
        self.optimizer = self.engine.optimizer([p for p in self.model.parameters() if p.requires_grad],
                                               lr=args.train.lr, weight_decay=args.train.weight_decay)
        # CPM-Bee: --epoch decides the length, --train-iters sizes the schedule; the qlora PR also stops there.
        self.max_steps = args.train.max_steps
        self.schedule = LRSchedule(self.optimizer, args.train.lr_decay_style, args.train.lr, args.train.warmup_iters,
                                   args.train.lr_decay_iters or args.train.schedule_iters)
        self.train_data = self._dataset(args.train.dataset, args.train.batch_size, args.train.drop_last)
        self.step, self.epoch, self.best_eval, self.patience = 0, 0, math.inf, 0
        self._resume()
        # Every rank has checked --save's history (resume.check_history) before rank 0 writes metrics.jsonl
        # there: a slower rank would otherwise take it for an earlier run's.
        self.engine.barrier()
        tb_dir = args.train.tensorboard or (os.path.join(args.saving.save, "tensorboard") if args.saving.save else None)
        self.metrics = MetricsLogger(args.saving.save, tb_dir, self.engine.is_main, resume_step=self.step)
        return self

    @property
    def use_lora(self) -> bool:
        return self.lora is not None

    # ---------------------------------------------------------------- setup
    def _lock_save_dir(self) -> resume.SaveDirLock | None:
        """Rank 0 takes the save-dir lock; every rank raises if it could not (no rank left waiting)."""
        if not self.args.saving.save:
            return None
        lock, error = None, None
        if self.engine.is_main:
            os.makedirs(self.args.saving.save, exist_ok=True)
            try:
                lock = resume.SaveDirLock(self.args.saving.save)
            except TrainingError as e:
                error = e
        if self.engine.all_reduce_sum(float(error is not None)) > 0:
            raise error or TrainingError(f"`save` {self.args.saving.save} is in use by another run (see rank 0)")
        return lock

    def _load_config(self) -> CPMBeeConfig:
        config = self.args.model.resolve_config()
        self.engine.check_consistent(config.to_dict(), "model config")
        if config.quantization is not None and not self.use_lora:
            kind = config.quantization.kind
            raise TrainingError(
                f"{config.source} sets {kind} but LoRA is off: the quantized base is frozen, so nothing "
                f"would train. Add `use_delta` (QLoRA) or set \"{kind}\": false (full fine-tuning)."
            )
        if config.int4:
            # Chosen once, here, for this device; the saved model_config.cpm_live.json records it.
            resolved = config.resolve_compute_dtype(self.engine.device)
            if config.int4_compute_dtype != resolved.int4_compute_dtype:
                self.engine.print_rank0(f"int4 compute dtype: {config.int4_compute_dtype} -> "
                                        f"{resolved.int4_compute_dtype} on {self.engine.device.type} "
                                        f"(model dtype {str(config.dtype).removeprefix('torch.')})")
            config = resolved
        return config

    def _load_tokenizer(self) -> CPMBeeTokenizer:
        tokenizer = self.args.model.tokenizer()
        if tokenizer.vocab_size != self.config.vocab_size:
            self.engine.print_rank0(
                f"warning: vocab has {tokenizer.vocab_size} tokens but {self.config.source} says "
                f"vocab_size={self.config.vocab_size}; ext-token labels start at the vocab size"
            )
        return tokenizer

    def _build_model(self) -> torch.nn.Module:
        args, engine = self.args, self.engine
        if not args.model.load:
            engine.print_rank0("warning: no --load given; training from random initialisation")
        model = load_base(args.model, self.config)
        if self.use_lora:
            add_lora(model, self.lora)
        engine.print_rank0(trainable_parameter_report(model))
        return engine.wrap(model, blocks=model.encoder.layers, recompute=args.train.activation_checkpointing)

    def _dataset(self, path: str, batch_size: int, drop_last: bool) -> FinetuneDataset:
        return FinetuneDataset(path, batch_size, self.args.train.max_length, self.tokenizer, max_depth=8,
                               task_name=self.args.train.task_name, drop_last=drop_last,
                               rank=self.engine.rank, world_size=self.engine.world_size,
                               seed=self.args.engine.seed)

    def _resume(self) -> None:
        args, saving = self.args, self.args.saving
        path = None
        if saving.resume:
            path = resume.find_checkpoint(saving.resume, saving.save, warn=self.engine.print_rank0)
        resume.check_history(path, saving.save, self._run_outputs())
        self._resumed_from = path
        if path is None:
            self.step = args.train.start_step
            if args.saving.resume == "auto":
                self.engine.print_rank0(f"no checkpoint under {args.saving.save}; starting from step {self.step}")
            return
        saved = resume.load_checkpoint(path, self.engine.rank)
        resume.compare_run(saved["trainer"].get("run"), self._run_settings(), path, self.engine.print_rank0)
        self.engine.load_state_dict(self.model, saved["trainable"], strict=False)
        self.engine.load_training_state(self.optimizer, saved["optimizer"])
        trainer = saved["trainer"]
        self.step, self.epoch = trainer["step"], trainer["epoch"]
        self.best_eval, self.patience = trainer["best_eval"], trainer["patience"]
        self.best_step = trainer.get("best_step")
        self._last_checkpoint = path
        self.train_data.load_state_dict(trainer["data"])
        resume.set_rng_state(saved["rng"])
        self.engine.print_rank0(f"resumed from {path} at step {self.step}, epoch {self.epoch}")

    def _run_outputs(self) -> list[str]:
        """Files a run writes under ``--save`` besides its checkpoints (see :meth:`save_weights`)."""
        name = self.args.saving.save_name
        return ["metrics.jsonl", *(f"{name}-delta-{tag}{ext}" for tag in ("best", "last") for ext in ("", ".pt")),
                f"{name}-best.pt", f"{name}-last.pt"]

    def _run_settings(self) -> dict[str, Any]:
        """What a resume must continue with (compared by :func:`resume.compare_run`): every setting that
        changes the base (its config, and the quantization settings that apply to it) or the adapter.
        The int4 compute dtype is left out: it changes how the same weights are multiplied, not them."""
        args, lora, config = self.args, self.lora, self.config
        model = {k: v for k, v in config.to_dict().items()
                 if k != "int4_compute_dtype" and (config.int4 or not k.startswith("int4_"))
                 and (config.int8 or k != "int8_threshold")}
        return {
            "model": model,
            "lora": None if lora is None else {"r": lora.r, "alpha": lora.alpha, "targets": sorted(lora.targets),
                                               "dropout": lora.dropout},
            "max_length": args.train.max_length,
            "data": resume.data_fingerprint(args.train.dataset),
            "batch": {"batch_size": args.train.batch_size, "world_size": self.engine.world_size,
                      "accumulation": args.train.gradient_accumulation_steps},
        }

    def _report_dropped(self) -> None:
        """Say at once when records are dropped for --max-length: the first (where, how long), and when
        more than DROPPED_WARN_SHARE of the records read so far are; the step log carries the count."""
        data, max_length = self.train_data, self.args.train.max_length
        if data.first_skipped is not None and not self._told_dropped:
            where, length = data.first_skipped
            self.engine.print_rank0(f"warning: {where}: the record has at least {length} tokens, more than "
                                    f"--max-length {max_length}: dropped (so is every longer record; the step "
                                    f"log counts them)")
            self._told_dropped = True
        share = data.num_skipped / max(data.num_read, 1)
        if share > DROPPED_WARN_SHARE and data.num_read >= 10 and not self._warned_share:
            self.engine.print_rank0(f"warning: {data.num_skipped} of the {data.num_read} records read so far "
                                    f"({share:.0%}) were longer than --max-length {max_length} and dropped: raise "
                                    f"--max-length, or shorten the records of {self.args.train.dataset}")
            self._warned_share = True

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self._stop_requested:  # a second signal: the run is stuck before a step boundary; die now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self._stop_requested = signal.Signals(signum).name

    # ---------------------------------------------------------------- steps
    def _filled(self, batch: dict[str, Any] | None) -> tuple[LabelledInputs, bool]:
        """``(inputs, real)``. A rank without rows (None) gets a stand-in to run with weight 0:
        under FSDP every rank must make the same forward/backward collectives. The stand-in is its
        last real batch, or a one-token row before it has seen any."""
        if batch is not None:
            self._last_batch = LabelledInputs.from_arrays(batch)
            return self._last_batch.to(self.engine.device), True
        if self._last_batch is None:
            self._last_batch = LabelledInputs.placeholder()
        return self._last_batch.to(self.engine.device), False

    def _token_losses(self, batch: LabelledInputs) -> tuple[torch.Tensor, int]:
        """Sum of per-token cross entropy over labelled tokens, and their count."""
        return token_loss_sum(self.model, batch), batch.num_labels

    def _next_microbatches(self, it) -> list[dict[str, Any] | None]:
        """Up to ``accumulation`` micro-batches; an empty list at the end of the epoch."""
        out = []
        for _ in range(self.args.train.gradient_accumulation_steps):
            batch = next(it, StopIteration)
            if batch is StopIteration:
                break
            out.append(batch)
        return out

    def train_step(self, micro: list[dict[str, Any] | None]) -> dict[str, float]:
        """One optimizer step over ``micro`` batches.

        The loss is the mean over every labelled token of the global step (all micro-batches, all
        ranks): each micro-batch's *sum* is divided by the global token count, and multiplied by the
        world size because the engine averages gradients across ranks. A rank without rows (None)
        re-runs its previous batch with weight 0 so the collectives still line up.
        """
        engine = self.engine
        batches = [self._filled(b) for b in micro]
        local_tokens = sum(b.num_labels for b, real in batches if real)
        global_tokens = engine.all_reduce_sum(float(local_tokens))
        if global_tokens == 0:
            raise TrainingError(
                f"step {self.step + 1}: no record in this step's batches of {self.args.train.dataset} has an answer "
                "to learn (an '<ans>' field); check the data's keys (e.g. a misspelt \"<ans>\")"
            )
        lr = self.schedule.apply(self.step)
        start = time.perf_counter()
        loss_sum = 0.0
        for batch, real in batches:
            loss, _ = self._token_losses(batch)
            weight = engine.world_size / max(global_tokens, 1.0) if real else 0.0
            engine.backward(loss * weight)
            loss_sum += float(loss.detach()) if real else 0.0
        grad_norm = engine.clip_grad_norm(self.args.train.clip_grad if self.args.train.clip_grad > 0 else math.inf)
        loss = engine.all_reduce_sum(loss_sum) / max(global_tokens, 1.0)
        self._check_finite(loss, grad_norm)
        stepped = engine.step(self.optimizer)
        engine.zero_grad(self.optimizer)
        elapsed = time.perf_counter() - start
        rows_tokens = sum(int(b.inputs.length.sum()) for b, real in batches if real)
        return {
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "loss_scale": engine.loss_scale,
            "skipped": not stepped,
            "tokens_per_s": engine.all_reduce_sum(float(rows_tokens)) / max(elapsed, 1e-9),
        }

    def _check_finite(self, loss: float, grad_norm: float) -> None:
        """Stop before the optimizer applies a non-finite update (the same values on every rank).

        A non-finite gradient under a live loss scale (fp16) is an overflow the engine skips and
        answers by lowering the scale; a non-finite loss, or a non-finite gradient with no scale left
        to lower, means the weights or data produce NaN/inf and training would only spread it.
        """
        if math.isfinite(loss) and (math.isfinite(grad_norm) or self.engine.loss_scale > 1.0):
            return
        source = f"`load` {self.args.model.load}" if self.args.model.load else "the model weights"
        raise TrainingError(
            f"step {self.step + 1}: loss {loss} and grad_norm {grad_norm} are not finite; stopped before the "
            f"update, nothing saved. Check {source} for NaN/inf values, lower `lr`, or use fp32 (\"half\": false)"
        )

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean eval loss over the whole eval set, across ranks."""
        self.model.eval()
        data = self._dataset(self.args.eval.eval_dataset, self.args.train.batch_size, drop_last=False)
        loss_sum, tokens = 0.0, 0
        with eval_bar("eval loss", None, self.engine.is_main) as bar:
            for batch in data.epoch():
                tensors, real = self._filled(batch)
                loss, n = self._token_losses(tensors)
                if real:
                    loss_sum, tokens = loss_sum + float(loss), tokens + n
                bar.update(data.num_read - bar.n)
        self.model.train()
        total_tokens = self.engine.all_reduce_sum(float(tokens))
        if total_tokens == 0:
            raise TrainingError(f"{self.args.eval.eval_dataset} has no record with an answer ('<ans>') to "
                                "evaluate; fix its keys or drop `eval_dataset`")
        eval_loss = self.engine.all_reduce_sum(loss_sum) / total_tokens
        if not math.isfinite(eval_loss):
            raise TrainingError(f"step {self.step}: eval loss on {self.args.eval.eval_dataset} is {eval_loss}; "
                                "the weights produce NaN/inf: nothing saved as best")
        return eval_loss

    # ---------------------------------------------------------------- saving
    def weights_path(self, tag: str) -> str | None:
        """Where :meth:`save_weights` puts ``tag`` (``best``/``last``); None without ``--save``."""
        saving = self.args.saving
        if not saving.save:
            return None
        if self.use_lora:
            return os.path.join(saving.save, f"{saving.save_name}-delta-{tag}")
        return os.path.join(saving.save, f"{saving.save_name}-{tag}.pt")

    def save_weights(self, notes: dict[str, str]) -> None:
        """Best/last weights (``notes``: tag -> how they were chosen): a peft adapter dir for LoRA, whose
        README.md and adapter_config.json carry the note; a CPM-Bee-layout .pt for full fine-tuning."""
        if not self.args.saving.save:
            return
        state = self.engine.state_dict(self.model, trainable_only=self.use_lora)
        if not self.engine.is_main:
            return
        for tag, note in notes.items():
            path = self.weights_path(tag)
            if self.use_lora:
                with resume.writing(path):
                    save_adapter(state, self.lora, path, base_config=self.config, note=note)
                    if self.args.saving.delta_format == "opendelta":
                        save_cpm_bee_delta(state, self.lora, path + ".pt")
            else:
                resume.save_weights_pt(state, path)

    def save_checkpoint(self) -> None:
        trainable = self.engine.state_dict(self.model, trainable_only=True)
        optimizer = self.engine.training_state(self.optimizer)
        trainer = {"step": self.step, "epoch": self.epoch, "best_eval": self.best_eval,
                   "patience": self.patience, "best_step": self.best_step, "data": self.train_data.state_dict(),
                   "run": self._run_settings()}
        path = resume.save_checkpoint(self.engine, self.args.saving.save, self.step, trainable, optimizer, trainer,
                                         keep=self.args.saving.keep_checkpoints)
        self._saved_step = self.step
        self._last_checkpoint = path
        self.engine.print_rank0(f"saved checkpoint {path}")

    # ---------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        """Run for --epoch epochs (or to --train-iters with --stop-at-train-iters), until early stopping or
        SIGTERM/SIGINT (caught only meanwhile: then ``stop_reason`` is the signal's name)."""
        previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        try:
            return self._train()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _train(self) -> dict[str, Any]:
        args, engine = self.args, self.engine
        note = args.train.length_note()
        if note:
            engine.print_rank0(note)
        if args.saving.save and engine.is_main:
            os.makedirs(args.saving.save, exist_ok=True)
            # CPM-Bee's CPMBeeConfig.from_json_file reads model_config.json (it refuses unknown keys);
            # the int4 settings of this project go beside it in the full config.
            self.config.to_json_file(os.path.join(args.saving.save, "model_config.json"), original=True)
            self.config.to_json_file(os.path.join(args.saving.save, "model_config.cpm_live.json"))
        self.model.train()
        # A bar on a terminal; timestamped log lines (every --log-interval steps) in files and CI logs.
        self._progress = StepProgress(self.max_steps, self.step, engine.is_main)
        stop_reason, first_epoch, resumed = None, True, self._resumed_from is not None
        while stop_reason is None:
            if self.epoch >= args.train.epoch:
                stop_reason = "epochs done"
                break
            batches, steps_before = self.train_data.epoch(), self.step
            while stop_reason is None and (micro := self._next_microbatches(batches)):
                stop_reason = self._step_and_bookkeeping(micro)
            if stop_reason is None:  # the epoch's data ran out
                self._report_dropped()
                # Only the first epoch after a resume may be empty (the run stopped at an epoch's end).
                if self.step == steps_before and not (resumed and first_epoch):
                    raise TrainingError(f"{args.train.dataset} gave no training batch: is it empty, or is every "
                                        f"record longer than `max_length` {args.train.max_length} tokens?")
                first_epoch = False
                self.epoch += 1
                self.train_data.start_next_epoch()
        self._progress.close()
        if stop_reason not in STOP_SIGNAL_NAMES:
            self.save_weights(self._final_weights())
            if args.saving.save_iters and self._saved_step != self.step:
                self.save_checkpoint()
        self.metrics.close()
        # Every rank leaves together: a rank that tears its process group down while rank 0 is still
        # writing the final weights was seen to abort at exit (SIGABRT in gloo, once in five CI runs).
        engine.barrier()
        dropped = self.train_data.num_skipped
        saved = ""
        if stop_reason in STOP_SIGNAL_NAMES:
            saved = ("; checkpoint saved, continue with --resume auto" if args.saving.save
                     else "; nothing saved (no --save)")
        engine.print_rank0(f"training stopped at step {self.step} ({stop_reason}){saved}" + (
            f"; {dropped} record(s) longer than --max-length {args.train.max_length} were dropped" if dropped else ""))
        engine.print_rank0(summary(self._outcome(stop_reason)))
        return {"step": self.step, "stop_reason": stop_reason, "best_eval": self.best_eval}

    def _final_weights(self) -> dict[str, str]:
        """The weights a finished run writes: ``last``, and ``best`` too when no evaluation chose one, so
        ``<name>-delta-best`` (what generation and export take) always exists."""
        notes = {"last": f"the weights after the last step, {self.step}"}
        if not math.isfinite(self.best_eval):
            reason = ("no `eval_dataset` was given" if not self.args.eval.eval_dataset else
                      f"no evaluation ran (`eval_interval` {self.args.eval.eval_interval} > the steps trained)")
            notes["best"] = f"the last weights, step {self.step}: {reason}, so no eval loss chose them"
        return notes

    def _outcome(self, stop_reason: str) -> RunOutcome:
        def existing(path: str | None) -> str | None:
            return path if path is not None and os.path.exists(path) else None

        evaluated = math.isfinite(self.best_eval)
        if evaluated:
            best_note = f"lowest eval loss {self.best_eval:.4f}, step {self.best_step or '?'}"
        else:
            best_note = self._final_weights().get("best", "")
        return RunOutcome(step=self.step, stop_reason=stop_reason, save=self.args.saving.save,
                          best=existing(self.weights_path("best")), best_note=best_note,
                          last=existing(self.weights_path("last")), checkpoint=self._last_checkpoint,
                          best_eval=self.best_eval if evaluated else None,
                          best_step=self.best_step)

    def _step_and_bookkeeping(self, micro: list[dict[str, Any] | None]) -> str | None:
        """Train one step, then log / evaluate / checkpoint; returns why to stop, or None."""
        args, engine = self.args, self.engine
        if self.max_steps is not None and self.step >= self.max_steps:
            return "train-iters reached"
        record = self.train_step(micro)
        self.step += 1
        record.update(step=self.step, epoch=self.epoch, peak_memory_mb=engine.peak_memory_mb(),
                      dropped_records=self.train_data.num_skipped)
        self._report_dropped()
        self._progress.update(record)
        if self.step % args.train.log_interval == 0:
            self.metrics.log(record)
            if not self._progress.on_terminal:
                engine.print_rank0(self._progress.line(record))
        if args.train.inspect_iters and self.step % args.train.inspect_iters == 0:
            engine.print_rank0(format_summary(inspect_model(self.model, engine=engine)))
        if args.eval.eval_dataset and self.step % args.eval.eval_interval == 0 and self._evaluate_and_stop():
            return "early stopping"
        if args.saving.save_iters and self.step % args.saving.save_iters == 0:
            self.save_checkpoint()
        # Every rank must agree to stop, or the others would wait in the next collective.
        if engine.all_reduce_sum(float(self._stop_requested is not None)) > 0:
            if args.saving.save and self._saved_step != self.step:
                self.save_checkpoint()
            return self._stop_requested or "SIGTERM"  # a rank without the signal stops with the others
        if self.max_steps is not None and self.step >= self.max_steps:
            return "train-iters reached"
        return None

    def _evaluate_and_stop(self) -> bool:
        started = time.monotonic()
        eval_loss = self.evaluate()
        record: dict[str, Any] = {"step": self.step, "eval_loss": eval_loss}
        if self.args.eval.eval_metrics:
            from cpm_live.training.eval_metrics import generation_metrics

            record.update(generation_metrics(self.model, self.tokenizer, self.args.eval,
                                             progress=self.engine.is_main))
        improved = eval_loss < self.best_eval
        if improved:
            self.best_eval, self.best_step, self.patience = eval_loss, self.step, 0
            self.save_weights({"best": f"lowest eval loss {eval_loss:.4f} on {self.args.eval.eval_dataset}, "
                                       f"step {self.step}"})
        else:
            self.patience += 1
        record["best_eval_loss"] = self.best_eval
        self.metrics.log(record, tb_prefix="eval")
        scores = "".join(f" {k} {v:.4f} |" for k, v in record.items() if k not in ("step", "eval_loss",
                                                                                  "best_eval_loss"))
        self.engine.print_rank0(f"{timestamp()} | step {self.step} | eval loss {eval_loss:.4f} |{scores} best "
                                f"{self.best_eval:.4f} | patience {self.patience}/{self.args.eval.early_stop_patience}"
                                f" | took {time.monotonic() - started:.1f} s")
        return self.patience >= self.args.eval.early_stop_patience
