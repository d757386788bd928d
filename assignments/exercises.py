"""The course's exercises, in one table: what each one blanks, which tests grade it, its points and hints.

Everything else reads this table: the hand-out (which function bodies to blank), the grader (which tests to
run for which exercise) and ASSIGNMENTS.md, whose per-exercise sections are rendered from it
(`python -m assignments doc` rewrites them; tests/test_assignments.py checks that they agree).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Exercise:
    number: int
    title: str
    functions: tuple  # "file.function" or "file.Class.method", file = its path without .py ("moe.route",
    #                   "evaluation/baselines.merge_ties"): the bodies to blank
    tests: tuple  # ((test file, (word, ...)), ...): its tests = those whose name contains a word (pytest -k)
    points: int
    goal: str  # what the student implements and learns (markdown)
    hints: tuple = ()
    extension: str = ""

    @property
    def files(self) -> tuple:
        """The source files that hold this exercise's regions, e.g. ("moe.py",) or ("evaluation/baselines.py",)."""
        return tuple(dict.fromkeys(name.split(".")[0] + ".py" for name in self.functions))

    def commands(self) -> list:
        """The pytest commands that grade this exercise, as a student types them."""
        return [f"python -m pytest -q {path} -k {keyword_expression(words)}" for path, words in self.tests]

    def selects(self, test_file: str, test_name: str) -> bool:
        """Does one of this exercise's pytest -k selections pick this test? (Name matching is what -k does
        with plain words; tests/test_assignments.py checks that no word could match anything else.)"""
        return any(test_file == path and any(w.lower() in test_name.lower() for w in words)
                   for path, words in self.tests)


def keyword_expression(words) -> str:
    """("a", "b") -> '"a or b"' (quoted for a shell when it has spaces)."""
    expression = " or ".join(words)
    return f'"{expression}"' if " " in expression else expression


EXERCISES = (
    Exercise(
        1, "Rotary position embeddings", ("model.rotary_cos_sin", "model.apply_rotary"),
        (("tests/test_model.py", ("rotary", "forward_matches", "kv_cache")),), 10,
        "Rotate each consecutive pair `(x[2i], x[2i+1])` of every query/key head by the angle `pos · θ^(-2i/d)`,\n"
        "exactly Meta's pairing (their code views the last dimension as `d/2` complex numbers). Graded against a\n"
        "direct cos/sin formula, a naive whole-model forward, and cached vs full decoding.",
        ("`x.unflatten(-1, (-1, 2))` views the last dimension as `d/2` pairs; `torch.stack(..., dim=-1).flatten(-2)`\n"
         "  puts them back.",
         "cos and sin are `[T, d/2]`: give them a head axis (`cos[:, None, :]`) so they broadcast over `[B, T, H, d/2]`.",
         "Rotate in float32 and cast back with `type_as(x)`; the angles are `outer(positions, inv_freq)`.")),
    Exercise(
        2, "Top-k routing", ("moe.select_top_k", "moe.route"),
        (("tests/test_moe.py", ("route_matches", "zero_router", "router_outputs", "float32_router", "tied_router",
                                "starves", "forced_expert", "any_router")),), 10,
        "From router logits `[N, E]`: softmax in float32 over all E experts, pick the top k, renormalise the k\n"
        "weights to sum to 1; `forced_expert = i` sends every token to expert i with weight 1.",
        ("Softmax first, over all E experts, then keep k: the gating loss reads the full distribution `probs`.",
         "Sort with `torch.sort(..., descending=True, stable=True)`: ties go to the lower expert index, which a zero\n"
         "  router (and the tests) rely on; `torch.topk` promises no order for ties.",
         "With `forced_expert`, `expert_idx` is `[N, 1]` filled with i and the weight is 1.0; `probs` stay the router's.")),
    Exercise(
        3, "The sorted, grouped dispatch",
        ("moe.sort_by_expert", "moe.dispatch_grouped", "moe.dispatch_slices", "moe.MoE.forward"),
        (("tests/test_moe.py", ("dispatch", "tied", "starves", "single_token", "gradcheck", "grouped_mm_path")),), 20,
        "Flatten the tokens, sort the `N·k` (token, slot) pairs by expert, gather the rows, run each expert on its\n"
        "contiguous block (`moe.dispatch_slices`, and all experts in one `torch._grouped_mm` call:\n"
        "`moe.dispatch_grouped` with the given `moe.grouped_linear`), weight, and scatter-add back with\n"
        "`index_add_`. No token may be dropped; an expert that receives nothing must get a zero gradient, not\n"
        "`None`. Graded on outputs and gradients against `moe.dense_moe_reference`, which runs every expert on\n"
        "every token.",
        ("`torch.argsort(flat_expert, stable=True)` over the `N·k` flattened expert ids; sorted row j holds token\n"
         "  `order[j] // k`. `torch.bincount(..., minlength=E)` counts every expert's rows, idle ones included.",
         "`rows.split(counts.tolist())` cuts the sorted rows into the experts' blocks; `w1.unbind(0)` gives expert\n"
         "  e's matrix as a view of the stacked parameter (so an idle expert still gets a zero gradient).",
         "Scatter back with `torch.zeros_like(x_flat).index_add_(0, rows, y)`: each token sums its k weighted rows.",
         "`MoE.forward` keeps `router_logits`, `router_probs` and `expert_idx` on the module (the losses read them),\n"
         "  computes the router in float32 with autocast off, and hands the sorted rows to `self.run_experts`."),
        "Extension: measure both backends against the ideal and the HF-style loop with `python bench/bench_moe.py`."),
    Exercise(
        4, "The gating loss L_G", ("losses.mean_router_probs", "losses.gating_loss"),
        (("tests/test_losses.py", ("gating",)),), 10,
        "For every example, average the router's full distribution over its real (non-padding) tokens and over all\n"
        "MoE layers, then take the mean negative log-likelihood of the example's dimension. Not a cross-entropy on\n"
        "probabilities (a second softmax squeezes the loss into a narrow band) and not averaged over padding — the\n"
        "two defects of the authors' release.",
        ("Start each function with its given check (`check_router_probs`, `check_task_labels` on the long labels;\n"
         "  section 4 of losses.py): the bad-input test expects their errors.",
         "Stack the layers to `[L, B, T, E]`, zero the padding with the mask, sum over layers and tokens, and divide\n"
         "  by (real tokens × layers) of each example.",
         "`p_bar.gather(1, task[:, None])` picks each example's probability; clamp it at `torch.finfo(dtype).tiny`\n"
         "  before the log.",
         "Examples with no real token are left out of the sum and of the count (`normalizer`).")),
    Exercise(
        5, "The drift loss L_R(γ)", ("losses.drift_loss",),
        (("tests/test_losses.py", ("drift",)), ("tests/test_training.py", ("gamma",))), 10,
        "`Σ_i γ_i Σ_{W ∈ expert i} ‖W − W_i⁰‖_F / n_layers` (Frobenius norm, not squared), and the `decay` reading\n"
        "`Σ_i γ_i Σ ‖W‖_F`. Mind the gradient at `W = W⁰` (the norm is not differentiable at 0: return a zero\n"
        "gradient, not NaN). The second test checks it end to end: a larger γ_i keeps expert i closer to its\n"
        "aligned model.",
        ("`moe.expert_parameters(model)` gives every stacked `[E, ...]` expert matrix by the name W⁰ is stored under;\n"
         "  `per_expert_norm` (section 3 of losses.py) is ‖·‖_F per expert, with a zero gradient at 0.",
         "Detach W⁰; divide by the number of MoE layers, not by the number of matrices.",
         "The inputs are checked elsewhere (`engineering/cli.py` `check_drift_inputs`), not here; FSDP2's sharded\n"
         "  experts and LoRA's deltas never reach your code as anything but the equation's tensors.")),
    Exercise(
        6, "Fusion (upcycling)", ("fusion.fuse_state_dicts",),
        (("tests/test_moe.py", ("forced_expert_i", "identical_experts", "fused_model", "router_init_random",
                                "fusion_refuses", "non_ffn_difference_is_reported")),), 10,
        "Build the fused model's state dict from loaded ones: every tensor but the FFNs from the base, and in every\n"
        "layer the router from `routers` and each stacked expert matrix `[E, ...]` from the aligned models' FFN\n"
        "matrices, expert i = aligned model i. Graded by the invariant that makes fusion correct: the fused model\n"
        "routed entirely to expert i computes exactly aligned model i's logits.",
        ("`is_ffn_key(name)` tells the dense FFN matrices (`layers.L.feed_forward.w1.weight`, ...), which the fused\n"
         "  model does not have, from everything it takes from the base.",
         "Expert i's `layers.L.feed_forward.w1.weight` `[H, D]` is row i of the MoE's `layers.L.feed_forward.w1`\n"
         "  `[E, H, D]`: `torch.stack` over the aligned models, for w1, w2 and w3 (`EXPERT_MATRICES`).",
         "The router of layer L is `layers.L.feed_forward.router.weight`, `[E, D]`."),
        "Extension: read `engineering/lean_fusion.py`, which fills the same tensors row by row, each rank of a\n"
        "torchrun only its own rows; `tests/test_moe.py` holds the two bit for bit."),
    Exercise(
        7, "A router initialisation", ("fusion.hidden_router_rows",),
        (("tests/test_moe.py", ("router_init_hidden",)),), 5,
        "Initialise router row i of every layer from the base model's mean normalised FFN input on dimension i's\n"
        "prompts, so that the untrained router already routes sensibly. Then try your own (e.g. the difference of\n"
        "the class means, or a few steps of logistic regression) and compare the routing accuracy after fusion with\n"
        "`python fuse.py --router-init ...` and `python evaluate.py`.",
        ("`ffn_inputs_by_layer(model, tokenizer, prompts)` gives, per layer, the FFN inputs `[n, D]` of all tokens.",
         "Normalise every input, average, normalise the mean; divide by the mean input norm of the layer so the\n"
         "  initial logits are about cos(x, direction_i).")),
    Exercise(
        8, "A weight-merging baseline (TIES)",
        ("evaluation/baselines.trim_top_magnitude", "evaluation/baselines.merge_ties"),
        (("tests/test_evaluate.py", ("ties", "trim")),), 10,
        "TIES merging: trim every task vector (aligned − base) to its largest-magnitude entries, elect a sign per\n"
        "weight by the summed mass, and average the entries that agree with it.",
        ("`flat.topk(k).values[-1]` is the smallest kept magnitude, `k = ceil(density · n)`; keep entries tied with it.",
         "Elect with `torch.sign(sum of trimmed)`: the mass, not a vote; a weight whose values cancel keeps the base.",
         "Disjoint mean: divide by the number of non-zero values that agree with the elected sign (at least 1)."),
        "Extension: add DARE (drop and rescale) as `merge_dare` next to it, with a hand-worked test of your own, and\n"
        "a row in `evaluate.py`'s table (`evaluation/baselines.py` `baseline_specs`)."),
    Exercise(
        9, "The output ensemble",
        ("evaluation/baselines.OutputEnsemble.__init__", "evaluation/baselines.OutputEnsemble.forward",
         "evaluation/baselines.OutputEnsemble.setup_cache", "evaluation/baselines.OutputEnsemble.clear_cache"),
        (("tests/test_evaluate.py", ("ensemble",)),), 10,
        "Average the aligned models' next-token probabilities at every decoding step, behind the same\n"
        "`forward / setup_cache / clear_cache` interface as `model.Transformer`, so `model.generate_tokens` works\n"
        "unchanged. It refuses members with different vocabularies.",
        ("Average probabilities, not logits; in log space that is `logsumexp` over the members' `log_softmax`\n"
         "  minus `log N`.",
         "Return log-probabilities: their argmax is the greedy token and their `log_softmax` is themselves.",
         "`setup_cache` / `clear_cache` pass the call on to every member.")),
    Exercise(
        10, "The learning-rate schedule and the FLOP count", ("trainer.lr_at", "trainer.flops_per_token"),
        (("tests/test_training.py", ("lr_schedule",)),), 5,
        "Linear warmup then cosine decay to 10 % of the peak; training FLOPs per token of a model with frozen and\n"
        "sparse (MoE) parameters.",
        ("`step` is 0-based: with warmup 4, steps 0..3 get 1/4, 2/4, 3/4, 4/4 of the peak.",
         "After warmup, progress `p = (step − warmup) / (total − warmup)` clamped at 1, and\n"
         "  `lr = max_lr · (min_ratio + (1 − min_ratio) · ½ (1 + cos πp))`.",
         "FLOPs: 2N forward + 2N backward to the inputs + 2N_trainable for the weight gradients; skip the\n"
         "  embedding and 1-D tensors, count a stacked expert tensor `[E, ...]` at top_k / E, and add attention's\n"
         "  `12 · layers · dim · seq_len`.")),
    Exercise(
        11, "Where the next seed lands", ("evaluation/seeds.prediction_interval",),
        (("tests/test_seeds.py", ("prediction_interval",)),), 5,
        "From one margin per seed, the 95 % interval that **one more seed's** margin should fall in — not the\n"
        "interval of the mean, which narrows as seeds are added. Graded by hand-computed values and by Monte Carlo:\n"
        "over 10,000 simulated runs the next draw must land inside 95 ± 1 % of the time, for 2 to 40 seeds.",
        ("A new seed's value misses the mean of n by its own variance s² plus the mean's s² / n: together a\n"
         "  spread of s · √(1 + 1/n).",
         "s is estimated from n values too, so the multiplier is Student's t with n − 1 degrees of freedom,\n"
         "  `t_975(n - 1)` (12.7 for 2 seeds), not the normal's 1.96.",
         "`np.std(x, ddof=1)`; fewer than 2 values give None."),
        "Seed 3 of the README's runs fell outside the bootstrap interval of the mean in 3 of 12 rows: train\n"
        "seeds 3-5 (`python pipeline.py --seeds N --ablations`) and check them against your interval\n"
        "(`seeds.py --held-out`)."),
)

BY_NUMBER = {e.number: e for e in EXERCISES}
DOC_BEGIN = "<!-- exercises: generated from assignments/exercises.py by `python -m assignments doc`; edit there -->"
DOC_END = "<!-- end of generated exercises -->"


def exercise_section(e: Exercise) -> str:
    """One exercise's section of ASSIGNMENTS.md."""
    lines = [f"## {e.number}. {e.title} — {', '.join(f'`{f}`' for f in e.functions)} ({e.points} points)", "",
             e.goal, "", "Graded by: " + " and ".join(f"`{c}`" for c in e.commands())]
    if e.hints:
        lines += ["", "Hints:"] + [f"- {h}" for h in e.hints]
    if e.extension:
        lines += ["", e.extension]
    return "\n".join(lines) + "\n"


def exercise_sections() -> str:
    """The generated part of ASSIGNMENTS.md, markers included."""
    total = sum(e.points for e in EXERCISES)
    body = "\n".join(exercise_section(e) for e in EXERCISES)
    return f"{DOC_BEGIN}\n\n{len(EXERCISES)} exercises, {total} points.\n\n{body}\n{DOC_END}"
