"""The input checks of the method's functions, one check_* per input, kept out of the files a student reads first.

Each raises the error its function raised before the checks moved here (the message names the function, what
was found and what was expected); the method files call them in one line. Flags are checked by cli.py, once,
before any compute (cli.check_gamma, cli.check_top_k, ...).

  check_logits_and_targets   losses.lm_loss: logits [B, T, V] and targets [B, T] agree on [B, T]
  check_router_probs         losses.mean_router_probs: some MoE layer, router probs [B, T, E] against mask [B, T]
  check_task_labels          losses.gating_loss: one label per example, each an expert index
  check_drift_inputs         what losses.drift_loss trusts (it checks nothing itself): the reading, one
                             gamma_i >= 0 per expert, a W^0 of the right shape for every stacked expert matrix.
                             fuse.py calls it once, right after it snapshots W^0 (the flag itself was
                             cli.check_gamma's; this checks the built model and its snapshot agree with it)
  check_trainable            trainer.build_optimizer: something to train
  check_batch_divides        trainer.train: the global batch splits evenly over the ranks
  check_finite               trainer.train: stop on a non-finite loss or gradient, the last good state intact
"""
import math

from engineering.lora import expert_loras
from moe import expert_parameters, moe_layers


def check_logits_and_targets(logits, targets):
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"lm_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on [B, T]")


def check_router_probs(router_probs_per_layer, mask):
    if not router_probs_per_layer:
        raise ValueError("mean_router_probs: router_probs_per_layer is empty; the model has no MoE layer")
    shape = (len(router_probs_per_layer), *router_probs_per_layer[0].shape)  # [L, B, T, E]
    if shape[1:3] != tuple(mask.shape):
        raise ValueError(f"mean_router_probs: router probs are [L, B, T, E] = {shape}, mask is "
                         f"{tuple(mask.shape)}; expected mask [B, T]")


def check_task_labels(task, p_bar):
    """task [B] against p_bar [B, E]."""
    if task.shape != p_bar.shape[:1]:
        raise ValueError(f"gating_loss: task has shape {tuple(task.shape)}, expected [B] = [{p_bar.shape[0]}]")
    E = p_bar.shape[1]
    if task.numel() and (task.min() < 0 or task.max() >= E):
        raise ValueError(f"gating_loss: task labels {task.tolist()} must lie in 0 .. {E - 1} (one per expert)")


def check_drift_inputs(model, initial_expert_weights, gamma, kind="drift"):
    """Everything losses.drift_loss trusts: kind, gamma (one finite value >= 0 per expert) and, for kind="drift",
    a W^0 (moe.snapshot_expert_weights) of the parameter's shape for every stacked expert matrix."""
    if kind not in ("drift", "decay"):
        raise ValueError(f"drift_loss: kind={kind!r}; expected 'drift' or 'decay'")
    layers = moe_layers(model)
    if not layers:
        raise ValueError("drift_loss: the model has no MoE layer")
    gamma = [float(g) for g in gamma]
    if len(gamma) != layers[0].n_experts:
        raise ValueError(f"drift_loss: gamma has {len(gamma)} values {gamma}, expected one per expert "
                         f"({layers[0].n_experts})")
    if any(g < 0 or g != g for g in gamma):
        raise ValueError(f"drift_loss: gamma {gamma} must be non-negative")
    loras = expert_loras(model)  # (a matrix with a LoRA delta is its own W^0: frozen, lora.lora_squared_norms)
    for key, w in expert_parameters(model).items() if kind == "drift" else ():
        if key in loras:
            continue
        if key not in initial_expert_weights:
            raise KeyError(f"drift_loss: no initial weight for {key}; take moe.snapshot_expert_weights(model) "
                           f"of this model right after building it")
        if tuple(initial_expert_weights[key].shape) != tuple(w.shape):
            raise ValueError(f"drift_loss: {key} is {tuple(w.shape)} but its initial weight is "
                             f"{tuple(initial_expert_weights[key].shape)}")


def check_trainable(params: list):
    if not params:
        raise ValueError("no trainable parameters")


def check_batch_divides(batch_size: int, world_size: int):
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the world size {world_size}")


def check_finite(metrics: dict, step: int, train_dir: str):
    """metrics of the 0-based step `step`."""
    if not all(math.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f"step {step + 1}: non-finite loss or gradient ({metrics}); the last good "
                                 f"checkpoint (if any) in {train_dir}/state is left intact")
