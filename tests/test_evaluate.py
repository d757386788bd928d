"""evaluate.py and evaluation/ against independent references: hand-worked merges and metrics,
naive loops, one-at-a-time runs."""
import json
import math
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

import evaluate
from data import toy
from data.format import format_prompt
from data.toy_scoring import is_refusal, kind_group, score_all
from evaluation.baselines import (OutputEnsemble, expert_drift, load_model, merge_soup,
                                  merge_task_arithmetic, merge_ties, trim_top_magnitude)
from evaluation.generation import generate_responses, sequence_logprobs, spread
from evaluation.real_suite import (judge_pairwise, judge_prob_a, lcs_length, load_judge,
                                   load_real_eval, mc1_mc2_from_logprobs, mentions_refusal_phrase,
                                   rouge_l, sentence_bleu, true_minus_false, truthfulqa_generation,
                                   truthfulqa_mc, win_rate)
from evaluation.report import plot_results
from evaluation.routing import routed_right_by_group, routing_stats
from data.tokenizer import Tokenizer
from engineering import export_hf
from engineering.checkpoints import load_checkpoint, save_checkpoint
from model import ModelArgs, Transformer, generate, generate_tokens, model_from_state
from moe import set_forced_expert
from engineering.tiny import make_tiny_checkpoint
from engineering.lean_fusion import build_fused_model

TASK_DIRS = ("helpful", "harmless", "honest")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models decode as many small ops; on a machine busy with other jobs two threads wait on
    each other (10x slower runs were seen), one thread never does. Restored after this file."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- fixtures: one tiny base, three "aligned" models (base + FFN noise), a fused model -----------


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    base_dir = make_tiny_checkpoint(str(root / "base"), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    seed=3)
    base, args = load_checkpoint(base_dir)
    tok_path = os.path.join(base_dir, "tokenizer.model")
    dirs = {"base": base_dir}
    # what stage 1 produces: only the FFN differs from the base
    for i, name in enumerate(TASK_DIRS):
        g = torch.Generator().manual_seed(100 + i)
        state = {k: (v + 0.3 * torch.randn(v.shape, generator=g) if ".feed_forward." in k
                     else v.clone())
                 for k, v in base.state_dict().items()}
        dirs[name] = save_checkpoint(state, str(root / name), tokenizer_path=tok_path, args=args)

    fused, _ = build_fused_model(base_dir, [dirs[n] for n in TASK_DIRS], top_k=2,
                                 router_init="random", router_std=1.0, verbose=False)
    dirs["fused"] = save_checkpoint(fused, str(root / "fused"), tokenizer_path=tok_path)
    dirs["root"] = str(root)
    return dirs


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """A toy-world eval set: the first record of every (dimension, kind) from
    data.toy (few, to stay fast)."""
    records = toy.build(0)["eval"]
    kinds = sorted({(r["task"], r["kind"]) for r in records})
    picked = [next(r for r in records if (r["task"], r["kind"]) == tk) for tk in kinds]
    d = tmp_path_factory.mktemp("toydata")
    with open(d / "eval.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in picked)
    return str(d)


def small_model(seed, **kw):
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, multiple_of=16,
                     max_seq_len=64, **kw)
    return Transformer(args).eval()


# ---- baselines.py: merges, by hand ---------------------------------------------------------------


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_soup_is_the_elementwise_mean():
    a, b = {"w": t(1, 2), "n": t(3)}, {"w": t(3, 6), "n": t(5)}
    out = merge_soup([a, b])
    assert torch.equal(out["w"], t(2, 4)) and torch.equal(out["n"], t(4))
    bf = merge_soup([{"w": t(1, 2).bfloat16()}, {"w": t(2, 3).bfloat16()}])
    assert bf["w"].dtype == torch.bfloat16 and torch.equal(bf["w"].float(), t(1.5, 2.5))


def test_task_arithmetic_by_hand_and_alpha_one_over_n_is_the_soup():
    base = {"w": t(1, 1, 1)}
    a1, a2 = {"w": t(2, 1, 0)}, {"w": t(1, 3, 1)}  # task vectors (1, 0, -1) and (0, 2, 0)
    out = merge_task_arithmetic(base, [a1, a2], alpha=0.5)
    assert torch.allclose(out["w"], t(1.5, 2.0, 0.5))  # 1 + 0.5 * (1, 2, -1)
    assert torch.allclose(merge_task_arithmetic(base, [a1, a2], alpha=1.0)["w"], t(2, 3, 0))
    a3 = {"w": t(0, 5, 2)}
    soup = merge_soup([a1, a2, a3])["w"]
    assert torch.allclose(merge_task_arithmetic(base, [a1, a2, a3], alpha=1 / 3)["w"], soup)


def test_trim_keeps_the_top_magnitudes():
    assert torch.equal(trim_top_magnitude(t(1, -3, 2, 0.5), 0.5), t(0, -3, 2, 0))
    # keeps ceil(0.2 * 4) = 1
    assert torch.equal(trim_top_magnitude(t(1, -3, 2, 0.5), 0.2), t(0, -3, 0, 0))
    assert torch.equal(trim_top_magnitude(t(1, -3, 2, 0.5), 1.0), t(1, -3, 2, 0.5))
    with pytest.raises(ValueError, match="density"):
        trim_top_magnitude(t(1, 2), 0.0)


def test_ties_hand_worked_example():
    base = {"w": t(1, 1, 1, 1, 1), "norm": t(2, 2)}
    taus = [t(3, -1, 2, 0.5, -4), t(-2, -3, 1, 0.2, 1), t(1, 0.5, -5, 0.1, -2)]
    aligned = [{"w": base["w"] + tau, "norm": t(2, 2)} for tau in taus]
    # density 0.4 of 5 entries -> keep 2 per task vector:
    #   trimmed 1 = ( 3,  0,  0, 0, -4)
    #   trimmed 2 = (-2, -3,  0, 0,  0)
    #   trimmed 3 = ( 0,  0, -5, 0, -2)
    #   sum       = ( 1, -3, -5, 0, -6)  -> elected sign (+, -, -, none, -)
    #   agreeing values: (3), (-3), (-5), (), (-4, -2)  -> disjoint mean (3, -3, -5, 0, -3)
    out = merge_ties(base, aligned, density=0.4, lam=1.0)
    assert torch.allclose(out["w"], t(4, -2, -4, 1, -2))
    assert torch.equal(out["norm"], t(2, 2))  # a tensor no aligned model changed stays the base's
    half = merge_ties(base, aligned, density=0.4, lam=0.5)
    assert torch.allclose(half["w"], t(2.5, -0.5, -1.5, 1, -0.5))


def test_ties_sign_is_elected_by_mass_not_by_count():
    base = {"w": t(0, 0)}
    # entry 0: +5 against two -1s -> the sum (+3) elects +, so only +5 survives
    # (a majority vote would pick -)
    # entry 1: +1, +1, -4 -> the sum (-2) elects -, the mean of the agreeing values is -4
    aligned = [{"w": t(5, 1)}, {"w": t(-1, 1)}, {"w": t(-1, -4)}]
    assert torch.allclose(merge_ties(base, aligned, density=1.0)["w"], t(5, -4))


def test_merges_refuse_mismatched_state_dicts():
    with pytest.raises(ValueError, match="shape"):
        merge_soup([{"w": t(1, 2)}, {"w": t(1, 2, 3)}])
    with pytest.raises(ValueError, match="keys"):
        merge_ties({"w": t(1)}, [{"w": t(1), "extra": t(2)}])


# ---- baselines.py: the output ensemble -----------------------------------------------------------


def test_ensemble_distribution_is_the_mean_of_the_softmaxes():
    members = [small_model(s) for s in (1, 2, 3)]
    ensemble = OutputEnsemble(members)
    tokens = torch.randint(3, 40, (2, 7))
    with torch.no_grad():
        got = ensemble(tokens).exp()  # [B, T, V]
        manual = sum(torch.softmax(m(tokens), dim=-1) for m in members) / 3
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 7))


def test_ensemble_greedy_decoding_with_cache_matches_a_naive_loop():
    members = [small_model(s) for s in (4, 5, 6)]
    ensemble = OutputEnsemble(members)
    prompts = [[1, 5, 9, 11], [1, 7]]
    got = generate_tokens(ensemble, prompts, max_new_tokens=6)
    for prompt, new in zip(prompts, got):
        seq = list(prompt)
        for _ in range(6):  # no cache, whole sequence each step, argmax of the manual average
            with torch.no_grad():
                probs = sum(torch.softmax(m(torch.tensor([seq]))[0, -1], -1) for m in members) / 3
            seq.append(int(probs.argmax()))
        assert new == seq[len(prompt):]


def test_ensemble_refuses_different_vocabularies():
    with pytest.raises(ValueError, match="vocab"):
        OutputEnsemble([small_model(1),
                        Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=41))])


# ---- baselines.py: forced expert -----------------------------------------------------------------


def test_forced_expert_reproduces_the_aligned_model(ckpts):
    fused, _ = load_model(ckpts["fused"])
    tokens = torch.randint(3, 300, (2, 9))
    for i, name in enumerate(TASK_DIRS):
        aligned, _ = load_model(ckpts[name])
        with torch.no_grad():
            torch.testing.assert_close(set_forced_expert(fused, i)(tokens), aligned(tokens),
                                       rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="expert=3"):
        set_forced_expert(fused, 3)
    with pytest.raises(ValueError, match="dense"):
        set_forced_expert(aligned, 0)


# ---- generation.py: batching never changes an answer or a likelihood -----------------------------


def test_batched_sorted_generation_equals_one_prompt_at_a_time(ckpts):
    model, tok = load_model(ckpts["helpful"])
    prompts = [format_prompt(q) for q in ("Where is the river?", "Why",
                                          "Tell me about the quick brown fox today.",
                                          "Name a tree.", "What is 2024 plus seven?")]
    _, _, texts = generate_responses(model, tok, prompts, max_new_tokens=7, batch_size=2)
    assert texts == [generate(model, tok, [p], max_new_tokens=7)[0] for p in prompts]


def naive_logprob(model, prefix, cont):
    """One sequence, no padding: sum of log-softmax at the continuation's positions."""
    seq = prefix + cont
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([seq[:-1]]))[0].double(), -1)  # [T, V]
    return sum(logp[len(prefix) - 1 + j, c].item() for j, c in enumerate(cont))


def test_sequence_logprobs_equal_unbatched_sums():
    model = small_model(7)
    pairs = [([1, 4, 5], [6, 7]), ([1, 9], [3, 3, 3, 8]), ([1, 2, 3, 4, 5, 6], [10])]
    got = sequence_logprobs(model, pairs, batch_size=2)
    for (prefix, cont), value in zip(pairs, got):
        assert value == pytest.approx(naive_logprob(model, prefix, cont), abs=1e-4)


# ---- real_suite.py: metrics, by hand -------------------------------------------------------------


def test_mc1_mc2_by_hand():
    lp = [-1.0, -2.0, -3.0]
    mc1, mc2 = mc1_mc2_from_logprobs(lp, [0, 1, 0])
    assert mc1 == 0.0 and mc2 == pytest.approx(math.exp(-2)
                                               / (math.exp(-1) + math.exp(-2) + math.exp(-3)))
    mc1, mc2 = mc1_mc2_from_logprobs(lp, [1, 1, 0])
    assert mc1 == 1.0 and mc2 == pytest.approx((math.exp(-1) + math.exp(-2))
                                               / sum(math.exp(x) for x in lp))
    with pytest.raises(ValueError, match="true option"):
        mc1_mc2_from_logprobs(lp, [0, 0, 0])


def test_truthfulqa_mc_end_to_end_equals_hand_computation(ckpts, tmp_path):
    """A 2-question file in the hub's multiple_choice schema, read by data.real, scored; the
    reference computes every option's log-likelihood separately, one unpadded sequence at a time,
    from model(tokens)."""
    from data.real import load_truthfulqa_mc

    rows = [
        {"question": "What happens if you cross the river?",
         "mc1_targets": {"choices": ["Nothing happens.", "You turn to stone.", "The river dies."],
                         "labels": [1, 0, 0]},
         "mc2_targets": {"choices": ["Nothing happens.", "You get wet.", "You turn to stone."],
                         "labels": [1, 1, 0]}},
        {"question": "Is the fox quick?",
         "mc1_targets": {"choices": ["Yes.", "No, the fox is a lazy dog."], "labels": [0, 1]},
         "mc2_targets": {"choices": ["Yes.", "No, the fox is a lazy dog.", "Seven."],
                         "labels": [0, 1, 1]}},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = load_model(ckpts["honest"])
    got = truthfulqa_mc(model, tok, load_truthfulqa_mc(str(path)), batch_size=3)
    mc1s, mc2s = [], []
    for r in rows:
        prefix = tok.encode(format_prompt(r["question"]), bos=True, eos=False)
        lp1 = [naive_logprob(model, prefix, tok.encode(c, bos=False, eos=False))
               for c in r["mc1_targets"]["choices"]]
        lp2 = [naive_logprob(model, prefix, tok.encode(c, bos=False, eos=False))
               for c in r["mc2_targets"]["choices"]]
        best = max(range(len(lp1)), key=lambda i: lp1[i])
        mc1s.append(float(r["mc1_targets"]["labels"][best] == 1))
        true2 = r["mc2_targets"]["labels"]
        mc2s.append(sum(math.exp(x) for x, y in zip(lp2, true2) if y)
                    / sum(math.exp(x) for x in lp2))
    assert got["tqa_mc1"] == pytest.approx(sum(mc1s) / 2)
    assert got["tqa_mc2"] == pytest.approx(sum(mc2s) / 2, rel=1e-4)
    assert 0.0 <= got["tqa_mc2"] <= 1.0
    # hub rows score the same
    assert got == pytest.approx(truthfulqa_mc(model, tok, rows, batch_size=2))


def test_rouge_l_by_hand():
    assert lcs_length("a b c d e".split(), "a c e f".split()) == 3
    # LCS(a b c d e, a c e f) = a c e: P = 3/5, R = 3/4, F = 2PR/(P+R) = 2/3
    assert rouge_l("A b, c d e.", "a c e f") == pytest.approx(2 / 3)
    assert rouge_l("The Cat sat", "the cat sat") == 1.0
    assert rouge_l("dog", "cat") == 0.0 and rouge_l("", "cat") == 0.0


def test_sentence_bleu_by_hand():
    # p1 = 5/6 (the x2, cat, on, mat), p2 = 3/5 (the cat, on the, the mat), p3 = 1/4 (on the mat),
    # p4 = 0/3 -> smoothed 1 / (2 * 3); equal lengths -> BP = 1
    got = sentence_bleu("the cat sat on the mat", "the cat is on the mat")
    assert got == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25)
    # short prediction: only orders 1..2 exist (p1 = p2 = 1); BP = exp(1 - 6/2)
    assert sentence_bleu("the cat", "the cat sat on the mat") == pytest.approx(math.exp(-2))
    assert sentence_bleu("a b c d e", "a b c d e") == pytest.approx(1.0)
    # no match at all: p1 = 1/(2*2), p2 = 1/(4*1) -> sqrt(1/16)
    assert sentence_bleu("x y", "a b") == pytest.approx(0.25)


def test_truthfulqa_generation_metric_is_true_minus_false():
    diff = true_minus_false("nothing happens", ["Nothing happens at all.", "No."], ["You die."],
                            rouge_l)
    # P = 2/2, R = 2/4 against the first true answer; 0 against the false one
    assert diff == pytest.approx(2 / 3)
    scores = truthfulqa_generation(["you die", "nothing happens"],
                                   [{"correct_answers": ["nothing happens"],
                                     "incorrect_answers": ["you die"]}] * 2)
    assert scores["tqa_rougeL_acc"] == 0.5 and scores["tqa_rougeL_diff"] == pytest.approx(0.0)


def test_limit_spreads_over_the_set():
    assert spread(list(range(10)), 4) == [0, 2, 5, 7]
    assert spread(list(range(3)), 5) == [0, 1, 2] and spread(list(range(3)), None) == [0, 1, 2]


def test_refusal_detector():
    assert mentions_refusal_phrase("I'm sorry, but I cannot help with that.")
    assert mentions_refusal_phrase("I can\u2019t do that.") and mentions_refusal_phrase("   ")
    assert not mentions_refusal_phrase("Sure! First, get a crowbar.")
    # the toy world's exact detector is a different rule on purpose: an empty
    # answer is no refusal there
    assert not is_refusal("") and not is_refusal("I apologize, as an AI I must decline.")


def test_judge_reads_a_vs_b_and_position_swap_is_symmetric(ckpts):
    judge = load_judge(ckpts["base"])
    prompt = "Is water wet? Answer with A or B.\nAnswer:"
    (p,) = judge_prob_a(judge, [prompt])
    prefix = judge.tokenizer.encode(prompt, bos=True, eos=False)
    lp_a = naive_logprob(judge.model, prefix, judge.tokenizer.encode("A", bos=False, eos=False))
    lp_b = naive_logprob(judge.model, prefix, judge.tokenizer.encode("B", bos=False, eos=False))
    assert p == pytest.approx(math.exp(lp_a) / (math.exp(lp_a) + math.exp(lp_b)), abs=1e-5)
    # swapping which answer is "the model's" and which is "the reference"
    # gives complementary preferences
    forward = judge_pairwise(judge, ["Name a tree."], ["An oak."], ["A stone."])[0]
    backward = judge_pairwise(judge, ["Name a tree."], ["A stone."], ["An oak."])[0]
    assert forward + backward == pytest.approx(1.0)
    assert win_rate([0.7, 0.5, 0.2]) == pytest.approx(0.5)


# ---- routing.py: routing statistics vs a naive loop ----------------------------------------------


def naive_routing(model, sequences, tasks):
    from moe import moe_layers

    layers, E, k = moe_layers(model), model.params.n_experts, model.params.top_k
    L = len(layers)
    top1 = [[[0] * E for _ in range(L)] for _ in range(3)]
    topk = [[[0] * E for _ in range(L)] for _ in range(3)]
    n = [0, 0, 0]
    entropy, correct = 0.0, 0
    for seq, task in zip(sequences, tasks):
        with torch.no_grad():
            model(torch.tensor([seq]))
        n[task] += len(seq)
        for l, layer in enumerate(layers):
            for pos in range(len(seq)):
                p = layer.router_probs[0, pos].tolist()
                order = sorted(range(E), key=lambda e: -p[e])  # stable: ties go to the lower index
                top1[task][l][order[0]] += 1
                for e in order[:k]:
                    topk[task][l][e] += 1
                entropy -= sum(x * math.log(x) for x in p if x > 0)
                correct += order[0] == task
    total = sum(n) * L
    return {"routing_acc": correct / total, "router_entropy": entropy / total,
            "usage_top1": [[[c / n[d] for c in row] for row in top1[d]] for d in range(3)],
            "usage_topk": [[[c / n[d] for c in row] for row in topk[d]] for d in range(3)]}


def test_routing_stats_match_a_naive_loop(ckpts):
    model, _ = load_model(ckpts["fused"])
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3, 12, 7, 4]
    sequences = [[1] + torch.randint(3, 300, (n - 1,), generator=g).tolist() for n in lengths]
    tasks = [0, 1, 2, 2, 0, 1]
    got = routing_stats(model, sequences, tasks, batch_size=4)  # padded batches
    want = naive_routing(model, sequences, tasks)
    assert got["routing_acc"] == pytest.approx(want["routing_acc"])
    assert got["router_entropy"] == pytest.approx(want["router_entropy"], rel=1e-5)
    for i, dim in enumerate(TASK_DIRS):
        torch.testing.assert_close(torch.tensor(got["usage_top1"][dim]),
                                   torch.tensor(want["usage_top1"][i]))
        torch.testing.assert_close(torch.tensor(got["usage_topk"][dim]),
                                   torch.tensor(want["usage_topk"][i]))
        for row in got["usage_topk"][dim]:
            assert sum(row) == pytest.approx(2.0)  # every token sits in exactly k = 2 top-k sets


def naive_example_routing(model, sequences, tasks, prompt_lengths):
    """Per example: p̄ = the router softmax averaged over (its first n tokens) x
    layers, one example at a time."""
    from moe import moe_layers

    right, right_prompt = 0, 0
    for seq, task, n_prompt in zip(sequences, tasks, prompt_lengths):
        with torch.no_grad():
            model(torch.tensor([seq]))
        layers = moe_layers(model)
        p_all = sum(layer.router_probs[0].double().mean(0) for layer in layers) / len(layers)  # [E]
        p_prompt = sum(layer.router_probs[0, :n_prompt].double().mean(0)
                       for layer in layers) / len(layers)
        right += int(p_all.argmax()) == task
        right_prompt += int(p_prompt.argmax()) == task
    return right / len(sequences), right_prompt / len(sequences)


def test_per_example_and_prompt_routing_match_a_naive_loop(ckpts):
    model, _ = load_model(ckpts["fused"])
    g = torch.Generator().manual_seed(1)
    lengths = [5, 9, 3, 12, 7, 4, 10, 6, 8, 11]
    sequences = [[1] + torch.randint(3, 300, (n - 1,), generator=g).tolist() for n in lengths]
    tasks = [0, 1, 2, 2, 0, 1, 1, 2, 0, 0]
    prompt_lengths = [max(1, n // 2) for n in lengths]
    got = routing_stats(model, sequences, tasks, batch_size=3, prompt_lengths=prompt_lengths)
    want_all, want_prompt = naive_example_routing(model, sequences, tasks, prompt_lengths)
    assert got["routing_acc_example"] == pytest.approx(want_all)
    assert got["routing_acc_example_prompt"] == pytest.approx(want_prompt)
    # the random router is neither always right nor always wrong
    assert 0 < want_all < 1 or 0 < want_prompt < 1
    # per token on the prompt alone: the naive loop over (prompt token, layer) pairs
    from moe import moe_layers

    hits = total = 0
    for seq, task, n in zip(sequences, tasks, prompt_lengths):
        with torch.no_grad():
            model(torch.tensor([seq]))
        for layer in moe_layers(model):
            hits += int((layer.expert_idx[0, :n, 0] == task).sum())
            total += n
    assert got["routing_acc_prompt"] == pytest.approx(hits / total)
    assert len(got["mean_router_probs"]) == len(sequences)


def test_routing_stats_of_a_uniform_router(ckpts):
    """A zero router: probabilities 1/3 each, ties -> expert 0 is top-1
    everywhere; entropy = log 3."""
    model, _ = load_model(ckpts["fused"])
    from moe import moe_layers

    for layer in moe_layers(model):
        layer.router.weight.data.zero_()
    got = routing_stats(model, [[1, 5, 6], [1, 7], [1, 8, 9, 10, 11]], [0, 1, 2])
    # only the 3 helpful tokens are routed "right"
    assert got["routing_acc"] == pytest.approx(3 / 10)
    assert got["router_entropy"] == pytest.approx(math.log(3))
    assert got["usage_top1"]["honest"] == [[1.0, 0.0, 0.0]] * 2
    assert got["usage_topk"]["harmless"] == [[1.0, 1.0, 0.0]] * 2


# ---- evaluate.py, the command line: results file, table, baselines, errors -----------------------


def test_cli_toy_suite_results_and_table(ckpts, toy_dir, tmp_path, capsys):
    out = str(tmp_path / "eval")
    results = evaluate.main([ckpts["helpful"], f"h3={ckpts['fused']}", "--data", toy_dir,
                             "--out", out, "--max-new-tokens", "6", "--batch-size", "5"])
    saved = json.load(open(os.path.join(out, "results.json")))
    assert [m["name"] for m in saved["models"]] == ["helpful", "h3"]
    assert [m["kind"] for m in saved["models"]] == ["dense", "fused"]
    records = toy.load_eval(toy_dir)
    for row in saved["models"]:
        lines = [json.loads(x) for x in open(row["responses"])]
        responses = [x["response"] for x in lines]
        want = {k: None if math.isnan(v) else v for k, v in score_all(records, responses).items()}
        assert row["metrics"] == pytest.approx(want)
    # the answers are exactly what one-prompt-at-a-time greedy decoding gives
    model, tok = load_model(ckpts["helpful"])
    lines = [json.loads(x) for x in open(saved["models"][0]["responses"])]
    for r, line in zip(records, lines):
        assert line["response"] == generate(model, tok,
                                            [format_prompt(r["instruction"], r["input"])], 6)[0]
    dense, fused = saved["models"]
    assert dense["routing"] is None and 0.0 <= fused["routing"]["routing_acc"] <= 1.0
    table = open(os.path.join(out, "results.md")).read()
    assert table in capsys.readouterr().out
    header, _, row_dense, row_fused = table.splitlines()[:4]
    assert "helpful ↑" in header and "harmful ↓" in header and "routed right: per example" in header
    # no routing for dense
    assert row_dense.startswith("| helpful | dense |") and row_dense.endswith("|  |  |")
    r = fused["routing"]
    assert row_fused.endswith(f"| {100 * r['routing_acc_example']:.1f} / "
                              f"{100 * r['routing_acc_example_prompt']:.1f} | "
                              f"{100 * r['routing_acc']:.1f} / "
                              f"{100 * r['routing_acc_prompt']:.1f} |")
    assert results["models"][1]["routing"]["routing_acc"] == fused["routing"]["routing_acc"]
    # per kind of prompt: the share of its examples whose saved p̄ (responses/) peaks
    # at their dimension's expert
    lines = [json.loads(x) for x in open(fused["responses"])]
    for kind, v in fused["details"]["by_kind"].items():
        mine = [x for x, r in zip(lines, records) if kind_group(r) == kind]
        peaks = [max(range(3), key=lambda e: x["mean_router_probs"][e]) == x["task"] for x in mine]
        assert v["routed"] == pytest.approx(sum(peaks) / len(peaks), abs=1e-9)
    assert all("routed" not in v for v in dense["details"]["by_kind"].values())


def test_routed_right_by_group_by_hand():
    # peaks at 0, 1, 0, 2
    probs = [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]]
    got = routed_right_by_group(probs, [0, 0, 2, 2], ["a", "a", "b", "c"])
    assert got == {"a": 0.5, "b": 0.0, "c": 1.0}
    with pytest.raises(ValueError, match="one of each per example"):
        routed_right_by_group(probs, [0, 0, 2], ["a", "a", "b", "c"])


def test_cli_builds_every_baseline(ckpts, toy_dir, tmp_path):
    out = str(tmp_path / "eval")
    results = evaluate.main(["--baselines", ",".join(ckpts[n] for n in ("base",) + TASK_DIRS),
                             ckpts["fused"], "--forced-experts", "--data", toy_dir, "--out", out,
                             "--max-new-tokens", "3"])
    names = [m["name"] for m in results["models"]]
    assert names == ["base", "helpful", "harmless", "honest", "soup", "task_arith", "ties",
                     "ensemble", "oracle", "fused", "fused[expert=0]", "fused[expert=1]",
                     "fused[expert=2]", "fused[oracle]"]
    # route-all-to-expert-i answers exactly like aligned model i; the soup row is the
    # soup of the aligned weights
    answers = {m["name"]: [json.loads(x)["response"] for x in open(m["responses"])]
               for m in results["models"]}
    for i, name in enumerate(TASK_DIRS):
        assert answers[f"fused[expert={i}]"] == answers[name]
    # the oracle answers each prompt with the model of its dimension (and the fused oracle with that
    # expert, which for this untrained fused model is the same aligned FFN)
    tasks = [json.loads(x)["task"] for x in open(os.path.join(toy_dir, "eval.jsonl"))]
    assert sorted(set(tasks)) == [0, 1, 2]
    want = [answers[TASK_DIRS[t]][i] for i, t in enumerate(tasks)]
    assert answers["oracle"] == want and answers["fused[oracle]"] == want
    # drift: the fused model was just built from the aligned models, so every expert sits at W^0
    fused_row = next(m for m in results["models"] if m["name"] == "fused")
    assert fused_row["drift"] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert "drift" in open(os.path.join(out, "results.md")).read()
    states = [load_checkpoint(ckpts[n])[0].state_dict() for n in TASK_DIRS]
    soup = model_from_state(load_checkpoint(ckpts["base"])[1], merge_soup(states)).eval()
    tok = Tokenizer(os.path.join(ckpts["base"], "tokenizer.model"))
    records = [json.loads(x) for x in open(os.path.join(toy_dir, "eval.jsonl"))][:3]
    for r, answer in zip(records, answers["soup"]):
        assert answer == generate(soup, tok, [format_prompt(r["instruction"], r["input"])], 3)[0]


@pytest.mark.slow  # compiles the decode step for each kind of row: dense, fused, each forced expert
def test_compiled_decoding_answers_every_row_as_eager_decoding(ckpts, toy_dir, tmp_path, capsys):
    """--compile-decode (engineering/compiled_decode.py) on every kind of row evaluate.py builds."""
    argv = ["--baselines", ",".join(ckpts[n] for n in ("base",) + TASK_DIRS), ckpts["fused"],
            "--forced-experts", "--data", toy_dir, "--max-new-tokens", "6", "--batch-size", "4"]
    eager = evaluate.main(argv + ["--out", str(tmp_path / "eager")])
    compiled = evaluate.main(argv + ["--out", str(tmp_path / "compiled"), "--compile-decode"])
    assert "compile_decode" not in eager["settings"] and compiled["settings"]["compile_decode"]
    assert capsys.readouterr().err.count("compiled the decode step in") == len(compiled["models"])
    for want, got in zip(eager["models"], compiled["models"]):
        answers = [[json.loads(x)["response"] for x in open(row["responses"])]
                   for row in (want, got)]
        assert answers[0] == answers[1], want["name"]
        assert got["metrics"] == want["metrics"] and got["routing"] == want["routing"]


def naive_drift(fused_state, aligned_states):
    """Per expert, layer by layer and matrix by matrix: sum of ||W_i - W_i^0||_F,
    divided by the layer count."""
    layers = sorted({int(k.split(".")[1]) for k in fused_state
                     if k.endswith("feed_forward.router.weight")})
    drift = [0.0] * len(aligned_states)
    for layer in layers:
        for matrix in ("w1", "w2", "w3"):
            stacked = fused_state[f"layers.{layer}.feed_forward.{matrix}"]
            for i, aligned in enumerate(aligned_states):
                w0 = aligned[f"layers.{layer}.feed_forward.{matrix}.weight"]
                drift[i] += math.sqrt(float(((stacked[i] - w0).double() ** 2).sum())) / len(layers)
    return drift


def test_expert_drift_matches_a_naive_loop(ckpts):
    """baselines.expert_drift (losses.drift_loss with one gamma at a time, W^0 stacked from the
    aligned checkpoints) against a loop over layers and matrices on the saved tensors."""

    model, _ = build_fused_model(ckpts["base"], [ckpts[n] for n in TASK_DIRS], top_k=2,
                                 verbose=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".feed_forward.w" in name:
                p.add_(torch.randn(p.shape, generator=g)
                       * torch.tensor([0.0, 0.1, 0.5])[:, None, None])
    aligned = [load_checkpoint(ckpts[n])[0].state_dict() for n in TASK_DIRS]
    got = expert_drift(model, aligned)
    want = naive_drift(model.state_dict(), aligned)
    assert got == pytest.approx(want, rel=1e-5)
    assert got[0] == pytest.approx(0.0, abs=1e-6) and got[1] < got[2]
    with pytest.raises(ValueError, match="not a fused"):
        expert_drift(load_checkpoint(ckpts["helpful"])[0], aligned)


def test_cli_real_suite_on_generated_files(ckpts, tmp_path):
    from data.real import write_fixtures

    data = str(tmp_path / "real")
    write_fixtures(data)
    out = str(tmp_path / "eval")
    results = evaluate.main([ckpts["fused"], "--suite", "real", "--data", data, "--out", out,
                             "--max-new-tokens", "4", "--limit", "3"])
    metrics = results["models"][0]["metrics"]
    for key in ("tqa_mc1", "tqa_mc2", "tqa_rougeL_acc", "tqa_bleu_acc", "bt_harmful_detector"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["alpaca_win_judge"] is None and results["judge"] is None
    assert "n/a (no judge)" in open(os.path.join(out, "results.md")).read()
    results = evaluate.main([ckpts["helpful"], "--suite", "real", "--data", data, "--out", out,
                             "--overwrite", "--max-new-tokens", "4", "--limit", "2",
                             "--judge", ckpts["base"]])
    metrics = results["models"][0]["metrics"]
    assert 0.0 <= metrics["alpaca_win_judge"] <= 1.0 and 0.0 <= metrics["bt_harmful_judge"] <= 1.0
    assert results["judge"]["name"] == "base"
    table = open(os.path.join(out, "results.md")).read()
    assert "win rate (judge: base)" in table.splitlines()[0] and "Judge: base" in table


def test_real_suite_from_one_path_per_dataset(tmp_path):
    """--data NAME=PATH,...: the original TruthfulQA.csv (generation and, derived from it, MC), a
    BeaverTails download and the AlpacaEval file, each where the user keeps it; the same records as
    the hub layouts give."""
    from data.real import write_fixtures

    fx = write_fixtures(str(tmp_path / "real"))
    spec = (f"truthfulqa={fx['truthfulqa_csv']},beavertails={fx['beavertails']},"
            f"alpaca-eval={fx['alpaca_eval']}/alpaca_eval.json")
    sets, missing = load_real_eval(spec)
    hub_layout, _ = load_real_eval(str(tmp_path / "real"))
    assert not missing and sets == hub_layout
    with pytest.raises(ValueError, match="expected NAME=PATH pairs"):
        load_real_eval(f"tqa={fx['truthfulqa_csv']}")
    with pytest.raises(FileNotFoundError, match="truthfulqa=nope.csv: not found"):
        load_real_eval("truthfulqa=nope.csv")


def test_plots_only_with_matplotlib(tmp_path, monkeypatch):
    results = {"suite": "toy",
               "models": [{"name": "m",
                           "metrics": {"helpful": 0.5, "harmful": 0.2, "truthful": 0.1},
                           "routing": {"usage_top1": {"helpful": [[0.5, 0.3, 0.2]]}}}]}
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    assert plot_results(results, str(tmp_path)) == []
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    written = plot_results(results, str(tmp_path))
    assert [os.path.basename(p) for p in written] == ["scores.png", "routing_m.png"]


def test_baselines_take_metas_vocab_minus_one_and_a_hf_directory(ckpts, toy_dir, tmp_path):
    """Meta ships params.json with "vocab_size": -1; train_expert.py writes the resolved size. The
    configs are compared resolved, so that base and its aligned models (one of them a Hugging Face
    export) make the baselines."""
    base = tmp_path / "base"
    shutil.copytree(ckpts["base"], base)
    params = json.loads((base / "params.json").read_text())
    (base / "params.json").write_text(json.dumps(params | {"vocab_size": -1}))
    helpful_hf = str(tmp_path / "helpful")
    export_hf.main([ckpts["helpful"], helpful_hf])
    results = evaluate.main(["--baselines",
                             f"{base},{helpful_hf},{ckpts['harmless']},{ckpts['honest']}",
                             "--data", toy_dir, "--out", str(tmp_path / "eval"),
                             "--max-new-tokens", "2"])
    assert [m["name"] for m in results["models"]] == ["base", "helpful", "harmless", "honest",
                                                      "soup", "task_arith", "ties", "ensemble",
                                                      "oracle"]


def test_clear_errors(ckpts, toy_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "eval"), "--data", toy_dir]
    with pytest.raises(FileNotFoundError, match="no/such/ckpt: checkpoint directory not found"):
        evaluate.main(["no/such/ckpt"] + out)
    with pytest.raises(SystemExit):
        evaluate.main([ckpts["base"], "--suite", "nope"] + out)
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--judge .*cannot load the judge"):
        evaluate.main([ckpts["base"], "--suite", "real", "--data", str(tmp_path),
                       "--judge", str(tmp_path / "nojudge")])
    with pytest.raises(ValueError, match="toy suite .* uses no judge"):
        evaluate.main([ckpts["base"], "--judge", ckpts["base"]] + out)
    with pytest.raises(ValueError, match="two models are named 'base'"):
        evaluate.main([ckpts["base"], ckpts["base"]] + out)
    # a baseline whose architecture differs from the base's
    other = make_tiny_checkpoint(str(tmp_path / "wide"), dim=64, n_layers=2, n_heads=4,
                                 n_kv_heads=2, seed=3)
    with pytest.raises(ValueError, match="wide/params.json has dim=64 but .*base has dim=32"):
        evaluate.main(["--baselines", f"{ckpts['base']},{ckpts['helpful']},{other}"] + out)
    # same architecture, different tokenizer
    diff_tok = make_tiny_checkpoint(str(tmp_path / "othertok"), dim=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, seed=9)
    with pytest.raises(ValueError, match="tokenizer.model differs"):
        evaluate.main(["--baselines", f"{ckpts['base']},{diff_tok}"] + out)
    with pytest.raises(FileNotFoundError, match="--data .*not found"):
        evaluate.main([ckpts["base"], "--data", str(tmp_path / "nodata"),
                       "--out", str(tmp_path / "eval")])
    # --out: a directory evaluate.py did not write is never touched; an earlier
    # evaluation only with --overwrite
    mine = tmp_path / "my_notes"
    mine.mkdir()
    (mine / "results.md").write_text("my own table")
    with pytest.raises(FileExistsError, match="not an evaluation written by evaluate.py"):
        evaluate.main([ckpts["base"], "--data", toy_dir, "--out", str(mine), "--overwrite"])
    assert ((mine / "results.md").read_text() == "my own table"
            and sorted(os.listdir(mine)) == ["results.md"])
    done = str(tmp_path / "done")
    evaluate.main([ckpts["base"], "--data", toy_dir, "--out", done, "--max-new-tokens", "2"])
    with pytest.raises(FileExistsError, match="holds an earlier evaluation; pass --overwrite"):
        evaluate.main([ckpts["base"], "--data", toy_dir, "--out", done, "--max-new-tokens", "2"])
