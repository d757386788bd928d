"""The run directory of a training run, and what makes it survive bad input and kills.

For an output directory OUT:
  OUT/        the model, in Meta's format (checkpoints.save_checkpoint: whole or not at all)
  OUT.train/  run.json (the arguments), log.jsonl (a JSON line per log step), state/ (--resume)

  check_run_dir     before any compute: refuse a directory this project did not write, a different
                    run without --overwrite, a --resume with different arguments; finish a save a
                    kill interrupted
  start_run_dir     write run.json once the inputs have loaded (a failed start leaves nothing)
  start_log         log.jsonl: fresh, or on --resume cut back to the step the saved state holds;
                    nest turns a metric named "load/layer0/expert1" into nested JSON for its lines
  save_model        gather the weights to rank 0 and write OUT in Meta's format, LoRA deltas merged
  save_train_state  model + optimizer state, step, RNG (torch.distributed.checkpoint, sharded as
                    the model is)
  load_train_state  the same, read back through fileio's safe reader (it runs no code from OUT)
  Run               everything trainer.train needs from outside, in one object: the process group
                    (rank, world_size, device, sum_over_ranks, autocast) and this directory (start,
                    log, step_done, save_state, finish)
"""
import json
import os
import shutil
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import model as M
from engineering import checkpoints as C
from tqdm import tqdm

from engineering.distributed import (Dist, all_reduce_sum, autocast_context, barrier,
                                     full_state_dict)
from engineering.fileio import (read_dcp_metadata, refuse_foreign_dir, safe_dcp_reader_and_planner,
                                write_atomic)
from engineering.lora import lora_targets, merge_lora


def check_run_dir(out_dir: str, run_args: dict, resume: bool, overwrite: bool, d: Dist) -> str:
    """Before any compute and before anything is written: refuse to clobber a different run, or a
    directory this project did not write (even with --overwrite, which replaces only our own
    output). Returns OUT.train."""
    train_dir = out_dir.rstrip("/") + ".train"
    run_json = os.path.join(train_dir, "run.json")
    if d.is_main:
        C.recover_checkpoint(out_dir)  # a model save that a kill stopped half-way
    barrier(d)
    refuse_foreign_dir(out_dir, "params.json", "a checkpoint written by this project (--out)")
    refuse_foreign_dir(train_dir, "run.json", "a training run written by this project (--out)")
    if resume:
        if d.is_main:
            recover_train_state(train_dir)  # a save a kill interrupted: finish or roll it back
        barrier(d)
        if not os.path.exists(os.path.join(train_dir, "state")):
            raise FileNotFoundError(f"--resume: no saved state in {train_dir}/state "
                                    f"(nothing to resume)")
        with open(run_json) as f:
            saved = json.load(f)
        changed = {k: (saved.get(k), v) for k, v in run_args.items()
                   if saved.get(k) != v and k not in ("resume", "overwrite", "steps")}
        if changed:
            raise ValueError(f"--resume: {run_json} was written with different arguments: "
                             f"{changed}")
    elif os.path.exists(os.path.join(out_dir, "params.json")) or os.path.exists(run_json):
        if not overwrite:
            raise FileExistsError(f"{out_dir}: holds an earlier run; "
                                  f"pass --resume to continue it or --overwrite to replace it")
    return train_dir


def start_run_dir(train_dir: str, run_args: dict, resume: bool, overwrite: bool, d: Dist):
    """Write OUT.train/run.json (after check_run_dir, once the data and the model have loaded: a
    start that fails on bad input leaves nothing behind)."""
    run_json = os.path.join(train_dir, "run.json")
    barrier(d)
    if d.is_main:
        if overwrite and not resume:
            shutil.rmtree(train_dir, ignore_errors=True)
        os.makedirs(train_dir, exist_ok=True)
        write_atomic(run_json, json.dumps(run_args, indent=2))
    barrier(d)


def save_model(model, out_dir: str, tokenizer_path: str, d: Dist):
    """Gather the full weights to rank 0 and write them in Meta's format (loadable by model.py);
    LoRA deltas are merged into their weights (lora.merge_lora), while OUT.train/state keeps them
    unmerged for --resume."""
    state = full_state_dict(model, d)
    # LoRA deltas merged, W + (alpha/r) B A: the checkpoint is a plain one (no-op without them)
    if d.is_main:
        state = merge_lora(state, lora_targets(model))
        C.save_checkpoint(state, out_dir, tokenizer_path=tokenizer_path, args=model.params)
    barrier(d)


# The resumable state lives in OUT.train/state. A save writes state.tmp, marks it COMPLETE once
# every rank has written, then swaps: state -> state.old, state.tmp -> state, delete state.old. A
# kill can stop it between any two of these; recover_train_state (run before every save and every
# resume) finishes or rolls back the swap, so the newest complete state is always found and a stale
# directory never blocks a later save.
COMPLETE = "COMPLETE"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def recover_train_state(train_dir: str):
    """Finish or roll back a save that a kill interrupted (rank 0 only; call between barriers).

    state.tmp complete and no state   -> it is the newest state: rename it into place
    state.tmp incomplete              -> a save that never finished: delete it
    state missing, state.old present  -> the swap stopped half-way: state.old back into place
    state and state.old both present  -> the swap had finished: delete state.old"""
    final, tmp, old = (os.path.join(train_dir, name)
                       for name in ("state", "state.tmp", "state.old"))
    if os.path.isdir(tmp) and is_complete(tmp) and not os.path.isdir(final):
        os.replace(tmp, final)
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.isdir(old):
        if not os.path.isdir(final):
            os.replace(old, final)
        else:
            shutil.rmtree(old)


def save_train_state(model, optimizer, step: int, train_dir: str, d: Dist):
    """Optimizer state, step and RNG, sharded as the model is (torch.distributed.checkpoint),
    written to a temporary directory and renamed into place by rank 0 after every rank has finished
    writing."""
    final, tmp, old = (os.path.join(train_dir, name)
                       for name in ("state", "state.tmp", "state.old"))
    if d.is_main:
        recover_train_state(train_dir)  # also clears a state.tmp a killed save left behind
    barrier(d)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # one process: expected
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save({"step": step, "torch_rng": torch.get_rng_state()},
               os.path.join(tmp, f"rank{d.rank}.pt"))
    barrier(d)
    if d.is_main:
        open(os.path.join(tmp, COMPLETE), "w").close()  # every rank has written its part
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier(d)


def load_train_state(model, optimizer, train_dir: str, d: Dist) -> int:
    path = os.path.join(train_dir, "state")
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    # a clear error here, before DCP wraps it in its own
    read_dcp_metadata(os.path.join(path, ".metadata"))
    reader, planner = safe_dcp_reader_and_planner(path)
    dcp.load(state, storage_reader=reader, planner=planner)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    rank_file = os.path.join(path, f"rank{d.rank}.pt")
    if not os.path.exists(rank_file):
        raise ValueError(f"{path}: written by a run with a different world size "
                         f"(no {os.path.basename(rank_file)})")
    extra = torch.load(rank_file, weights_only=True)
    torch.set_rng_state(extra["torch_rng"])
    return extra["step"]


def start_log(train_dir: str, start_step: int, resume: bool, d: Dist) -> str:
    """OUT.train/log.jsonl: a fresh log, or on --resume the log up to the step the saved state
    holds."""
    log_path = os.path.join(train_dir, "log.jsonl")
    if d.is_main:
        kept = [] if not resume or not os.path.exists(log_path) else [
            line for line in open(log_path) if logged_step(line) <= start_step]
        write_atomic(log_path, "".join(kept))
    return log_path


def logged_step(line: str) -> float:
    """The step of one log.jsonl line; inf for a line a kill cut short (it is dropped on
    --resume)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def nest(metrics: dict) -> dict:
    """{"load/layer0/expert1": x} -> {"load": {"layer0": {"expert1": x}}}, for a readable log
    line."""
    out = {}
    for key, value in metrics.items():
        *parents, leaf = key.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


class Run:
    """What trainer.train needs from outside: the process group and the run's directory OUT/ +
    OUT.train/.

    d: engineering.distributed.Dist (one process, or this rank of torchrun's). The trainer calls, in
    order: start (resume the saved state or begin; opens the log and the progress bar), then per
    step sum_over_ranks, autocast, log (at log steps), step_done, save_state (every --save-every
    steps), and finish (the model in Meta's format, LoRA deltas merged, and the final resumable
    state)."""

    def __init__(self, d: Dist, out_dir: str, train_dir: str, tokenizer_path: str, steps: int,
                 log_every: int, resume: bool = False):
        self.d, self.out_dir, self.train_dir, self.tokenizer_path = (d, out_dir, train_dir,
                                                                     tokenizer_path)
        self.steps, self.log_every, self.resume = steps, log_every, resume
        self.log_path = self.progress = None
        self.rank, self.world_size, self.device = d.rank, d.world_size, d.device

    # the process group

    def sum_over_ranks(self, values: list) -> list:
        """Each number summed over the ranks (float64; one process: as it is)."""
        return all_reduce_sum(torch.tensor(values, dtype=torch.float64), self.d).tolist()

    def autocast(self):
        """The context of a forward and its loss: bf16 autocast on one GPU, else nothing."""
        return autocast_context(self.d)

    # the directory

    def start(self, model, optimizer) -> int:
        """The first step: 0, or (--resume) the step the saved state holds, read into model and
        optimizer."""
        start_step = (load_train_state(model, optimizer, self.train_dir, self.d)
                      if self.resume else 0)
        self.log_path = start_log(self.train_dir, start_step, self.resume, self.d)
        if self.d.is_main:
            self.progress = tqdm(total=self.steps, initial=start_step,
                                 desc=os.path.basename(self.out_dir), file=sys.stdout,
                                 dynamic_ncols=True, disable=None)
            if self.resume:
                self.progress.write(f"resumed from step {start_step}")
        return start_step

    def log(self, record: dict):
        """One line of log.jsonl (metrics named "a/b/c" nested) and the progress bar's figures;
        without a terminal (the bar is off), a printed line every log step that is a tenth of the
        run."""
        if not self.d.is_main:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(nest(record)) + "\n")
        figures = ("step", "lr", "tokens_per_s", "eta_s", "mfu", "val_loss")
        metrics = [k for k in record if k not in figures and "/" not in k]
        shown = {k: record[k] for k in metrics + ["val_loss", "tokens_per_s", "mfu"] if k in record}
        self.progress.set_postfix(shown, refresh=False)
        step = record["step"]
        if self.progress.disable and (step % max(self.log_every, self.steps // 10) == 0
                                      or step == self.steps):
            print(f"step {step}/{self.steps} " + " ".join(f"{k}={v}" for k, v in shown.items())
                  + f" eta={tqdm.format_interval(record['eta_s'])}", flush=True)

    def step_done(self):
        if self.progress:
            self.progress.update(1)

    def save_state(self, model, optimizer, step: int):
        save_train_state(model, optimizer, step, self.train_dir, self.d)

    def finish(self, model, optimizer, step: int):
        if self.progress:
            self.progress.close()
        save_model(model, self.out_dir, self.tokenizer_path, self.d)
        save_train_state(model, optimizer, step, self.train_dir, self.d)
