"""The course's exercises, in one table: what each one blanks, which tests grade it, its points and
hints.

Everything else reads this table: the hand-out (which function bodies to blank), the grader (which
tests to run for which exercise) and ASSIGNMENTS.md, whose per-exercise sections are rendered from
it (`python -m assignments doc` rewrites them; tests/test_assignments.py checks that they agree).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Exercise:
    number: int
    title: str
    # the bodies to blank: "file.function" or "file.Class.method", file = its path without .py
    # ("moe.route", "evaluation/baselines.merge_ties")
    functions: tuple
    # ((test file, (word, ...)), ...): its tests = those whose name contains a word (pytest -k)
    tests: tuple
    points: int
    goal: str  # what the student implements and learns (markdown)
    hints: tuple = ()
    extension: str = ""

    @property
    def files(self) -> tuple:
        """The source files that hold this exercise's regions, e.g. ("moe.py",) or
        ("evaluation/baselines.py",)."""
        return tuple(dict.fromkeys(name.split(".")[0] + ".py" for name in self.functions))

    def commands(self) -> list:
        """The pytest commands that grade this exercise, as a student types them."""
        return [f"python -m pytest -q {path} -k {keyword_expression(words)}"
                for path, words in self.tests]

    def selects(self, test_file: str, test_name: str) -> bool:
        """Does one of this exercise's pytest -k selections pick this test? (Name matching is what
        -k does with plain words; tests/test_assignments.py checks that no word could match
        anything else.)"""
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
        "Rotate each consecutive pair `(x[2i], x[2i+1])` of every query/key head by the angle\n"
        "`pos · θ^(-2i/d)`, exactly Meta's pairing (their code views the last dimension as\n"
        "`d/2` complex numbers). Graded against a direct cos/sin formula, a naive whole-model\n"
        "forward, and cached vs full decoding.",
        ("`x.unflatten(-1, (-1, 2))` views the last dimension as `d/2` pairs;\n"
         "  `torch.stack(..., dim=-1).flatten(-2)` puts them back.",
         "cos and sin are `[T, d/2]`: give them a head axis (`cos[:, None, :]`) so they broadcast\n"
         "  over `[B, T, H, d/2]`.",
         "Rotate in float32 and cast back with `type_as(x)`; the angles are\n"
         "  `outer(positions, inv_freq)`.")),
    Exercise(
        2, "Top-k routing", ("moe.select_top_k", "moe.route"),
        (("tests/test_moe.py", ("route_matches", "zero_router", "router_outputs", "float32_router",
                                "tied_router", "starves", "forced_expert", "any_router")),), 10,
        "From router logits `[N, E]`: softmax in float32 over all E experts, pick the top k,\n"
        "renormalise the k weights to sum to 1; `forced_expert = i` sends every token to expert i\n"
        "with weight 1.",
        ("Softmax first, over all E experts, then keep k: the gating loss reads the full\n"
         "  distribution `probs`.",
         "Sort with `torch.sort(..., descending=True, stable=True)`: ties go to the lower expert\n"
         "  index, which a zero router (and the tests) rely on; `torch.topk` promises no order\n"
         "  for ties.",
         "With `forced_expert`, `expert_idx` is `[N, 1]` filled with i and the weight is 1.0;\n"
         "  `probs` stay the router's.")),
    Exercise(
        3, "The sorted, grouped dispatch",
        ("moe.sort_by_expert", "moe.dispatch_grouped", "moe.dispatch_slices", "moe.MoE.forward"),
        (("tests/test_moe.py", ("dispatch", "tied", "starves", "single_token", "gradcheck",
                                "grouped_mm_path")),), 20,
        "Flatten the tokens, sort the `N·k` (token, slot) pairs by expert, gather the rows, run\n"
        "each expert on its contiguous block (`moe.dispatch_slices`, and all experts in one\n"
        "`torch._grouped_mm` call: `moe.dispatch_grouped` with the given `moe.grouped_linear`),\n"
        "weight, and scatter-add back with `index_add_`. No token may be dropped; an expert that\n"
        "receives nothing must get a zero gradient, not `None`. Graded on outputs and gradients\n"
        "against `moe.dense_moe_reference`, which runs every expert on every token.",
        ("`torch.argsort(flat_expert, stable=True)` over the `N·k` flattened expert ids; sorted\n"
         "  row j holds token `order[j] // k`. `torch.bincount(..., minlength=E)` counts every\n"
         "  expert's rows, idle ones included.",
         "`rows.split(counts.tolist())` cuts the sorted rows into the experts' blocks;\n"
         "  `w1.unbind(0)` gives expert e's matrix as a view of the stacked parameter (so an idle\n"
         "  expert still gets a zero gradient).",
         "Scatter back with `torch.zeros_like(x_flat).index_add_(0, rows, y)`: each token sums\n"
         "  its k weighted rows.",
         "`MoE.forward` keeps `router_logits`, `router_probs` and `expert_idx` on the module (the\n"
         "  losses read them), computes the router in float32 with autocast off, and hands the\n"
         "  sorted rows to `self.run_experts`."),
        "Extension: measure both backends against the ideal and the HF-style loop with\n"
        "`python bench/bench_moe.py`."),
    Exercise(
        4, "The gating loss L_G", ("losses.mean_router_probs", "losses.gating_loss"),
        (("tests/test_losses.py", ("gating",)),), 10,
        "For every example, average the router's full distribution over its real (non-padding)\n"
        "tokens and over all MoE layers, then take the mean negative log-likelihood of the\n"
        "example's dimension. Not a cross-entropy on probabilities (a second softmax squeezes the\n"
        "loss into a narrow band) and not averaged over padding — the two defects of the\n"
        "authors' release.",
        ("Start each function with its given check (`check_router_probs`, `check_task_labels` on\n"
         "  the long labels; section 4 of losses.py): the bad-input test expects their errors.",
         "Stack the layers to `[L, B, T, E]`, zero the padding with the mask, sum over layers and\n"
         "  tokens, and divide by (real tokens × layers) of each example.",
         "`p_bar.gather(1, task[:, None])` picks each example's probability; clamp it at\n"
         "  `torch.finfo(dtype).tiny` before the log.",
         "Examples with no real token are left out of the sum and of the count (`normalizer`).")),
    Exercise(
        5, "The drift loss L_R(γ)", ("losses.drift_loss",),
        (("tests/test_losses.py", ("drift",)), ("tests/test_training.py", ("gamma",))), 10,
        "`Σ_i γ_i Σ_{W ∈ expert i} ‖W − W_i⁰‖_F / n_layers` (Frobenius norm, not\n"
        "squared), and the `decay` reading `Σ_i γ_i Σ ‖W‖_F`. Mind the gradient at\n"
        "`W = W⁰` (the norm is not differentiable at 0: return a zero gradient, not NaN).\n"
        "The second test checks it end to end: a larger γ_i keeps expert i closer to its\n"
        "aligned model.",
        ("`moe.expert_parameters(model)` gives every stacked `[E, ...]` expert matrix by the name\n"
         "  W⁰ is stored under; `per_expert_norm` (section 3 of losses.py) is ‖·‖_F per\n"
         "  expert, with a zero gradient at 0.",
         "Detach W⁰; divide by the number of MoE layers, not by the number of matrices.",
         "The inputs are checked elsewhere (`engineering/cli.py` `check_drift_inputs`), not here;\n"
         "  FSDP2's sharded experts and LoRA's deltas never reach your code as anything but the\n"
         "  equation's tensors.")),
    Exercise(
        6, "Fusion (upcycling)", ("fusion.fuse_state_dicts",),
        (("tests/test_moe.py", ("forced_expert_i", "identical_experts", "fused_model",
                                "router_init_random", "fusion_refuses",
                                "non_ffn_difference_is_reported")),), 10,
        "Build the fused model's state dict from loaded ones: every tensor but the FFNs from the\n"
        "base, and in every layer the router from `routers` and each stacked expert matrix\n"
        "`[E, ...]` from the aligned models' FFN matrices, expert i = aligned model i. Graded by\n"
        "the invariant that makes fusion correct: the fused model routed entirely to expert i\n"
        "computes exactly aligned model i's logits.",
        ("`is_ffn_key(name)` tells the dense FFN matrices (`layers.L.feed_forward.w1.weight`,\n"
         "  ...), which the fused model does not have, from everything it takes from the base.",
         "Expert i's `layers.L.feed_forward.w1.weight` `[H, D]` is row i of the MoE's\n"
         "  `layers.L.feed_forward.w1` `[E, H, D]`: `torch.stack` over the aligned models, for\n"
         "  w1, w2 and w3 (`EXPERT_MATRICES`).",
         "The router of layer L is `layers.L.feed_forward.router.weight`, `[E, D]`."),
        "Extension: read `engineering/lean_fusion.py`, which fills the same tensors row by row,\n"
        "each rank of a torchrun only its own rows; `tests/test_moe.py` checks that the two\n"
        "agree bit for bit."),
    Exercise(
        7, "A router initialisation", ("fusion.hidden_router_rows",),
        (("tests/test_moe.py", ("router_init_hidden",)),), 5,
        "Initialise router row i of every layer from the base model's mean normalised FFN input\n"
        "on dimension i's prompts, so that the untrained router already routes sensibly. Then try\n"
        "your own (e.g. the difference of the class means, or a few steps of logistic regression)\n"
        "and compare the routing accuracy after fusion with `python fuse.py --router-init ...`\n"
        "and `python evaluate.py`.",
        ("`ffn_inputs_by_layer(model, tokenizer, prompts)` gives, per layer, the FFN inputs\n"
         "  `[n, D]` of all tokens.",
         "Normalise every input, average, normalise the mean; divide by the mean input norm of\n"
         "  the layer so the initial logits are about cos(x, direction_i).")),
    Exercise(
        8, "A weight-merging baseline (TIES)",
        ("evaluation/baselines.trim_top_magnitude", "evaluation/baselines.merge_ties"),
        (("tests/test_evaluate.py", ("ties", "trim")),), 10,
        "TIES merging: trim every task vector (aligned − base) to its largest-magnitude\n"
        "entries, elect a sign per weight by the summed mass, and average the entries that agree\n"
        "with it.",
        ("`flat.topk(k).values[-1]` is the smallest kept magnitude, `k = ceil(density · n)`;\n"
         "  keep entries tied with it.",
         "Elect with `torch.sign(sum of trimmed)`: the mass, not a vote; a weight whose values\n"
         "  cancel keeps the base.",
         "Disjoint mean: divide by the number of non-zero values that agree with the elected sign\n"
         "  (at least 1)."),
        "Extension: add DARE (drop and rescale) as `merge_dare` next to it, with a hand-worked\n"
        "test of your own, and a row in `evaluate.py`'s table\n"
        "(`evaluation/baselines.py` `baseline_specs`)."),
    Exercise(
        9, "The output ensemble",
        ("evaluation/baselines.OutputEnsemble.__init__",
         "evaluation/baselines.OutputEnsemble.forward",
         "evaluation/baselines.OutputEnsemble.setup_cache",
         "evaluation/baselines.OutputEnsemble.clear_cache"),
        (("tests/test_evaluate.py", ("ensemble",)),), 10,
        "Average the aligned models' next-token probabilities at every decoding step, behind the\n"
        "same `forward / setup_cache / clear_cache` interface as `model.Transformer`, so\n"
        "`model.generate_tokens` works unchanged. It refuses members with different vocabularies.",
        ("Average probabilities, not logits; in log space that is `logsumexp` over the members'\n"
         "  `log_softmax` minus `log N`.",
         "Return log-probabilities: their argmax is the greedy token and their `log_softmax` is\n"
         "  themselves.",
         "`setup_cache` / `clear_cache` pass the call on to every member.")),
    Exercise(
        10, "The learning-rate schedule and the FLOP count",
        ("trainer.lr_at", "trainer.flops_per_token"),
        (("tests/test_training.py", ("lr_schedule",)),), 5,
        "Linear warmup then cosine decay to 10 % of the peak; training FLOPs per token of a model\n"
        "with frozen and sparse (MoE) parameters.",
        ("`step` is 0-based: with warmup 4, steps 0..3 get 1/4, 2/4, 3/4, 4/4 of the peak.",
         "After warmup, progress `p = (step − warmup) / (total − warmup)` clamped at 1, and\n"
         "  `lr = max_lr · (min_ratio + (1 − min_ratio) · ½ (1 + cos πp))`.",
         "FLOPs: 2N forward + 2N backward to the inputs + 2N_trainable for the weight gradients;\n"
         "  skip the embedding and 1-D tensors, count a stacked expert tensor `[E, ...]` at\n"
         "  top_k / E, and add attention's `12 · layers · dim · seq_len`.")),
    Exercise(
        11, "Where the next seed lands", ("evaluation/seeds.prediction_interval",),
        (("tests/test_seeds.py", ("prediction_interval",)),), 5,
        "From one margin per seed, the 95 % interval that **one more seed's** margin should fall\n"
        "in — not the interval of the mean, which narrows as seeds are added. Graded by\n"
        "hand-computed values and by Monte Carlo: over 10,000 simulated runs the next draw must\n"
        "land inside 95 ± 1 % of the time, for 2 to 40 seeds.",
        ("A new seed's value misses the mean of n by its own variance s² plus the mean's\n"
         "  s² / n: together a spread of s · √(1 + 1/n).",
         "s is estimated from n values too, so the multiplier is Student's t with n − 1 degrees\n"
         "  of freedom, `t_975(n - 1)` (12.7 for 2 seeds), not the normal's 1.96.",
         "`np.std(x, ddof=1)`; fewer than 2 values give None."),
        "Seed 3 of docs/results.md's runs fell outside the bootstrap interval of the mean in\n"
        "3 of 12 rows: train seeds 3-5 (`python pipeline.py --seeds N --ablations`) and check\n"
        "them against your interval (`python -m evaluation.seeds --held-out`)."),
)

BY_NUMBER = {e.number: e for e in EXERCISES}
DOC_BEGIN = ("<!-- exercises: generated from assignments/exercises.py "
             "by `python -m assignments doc`; edit there -->")
DOC_END = "<!-- end of generated exercises -->"


def exercise_section(e: Exercise) -> str:
    """One exercise's section of ASSIGNMENTS.md."""
    lines = [f"## {e.number}. {e.title} — {', '.join(f'`{f}`' for f in e.functions)} "
             f"({e.points} points)", "",
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
