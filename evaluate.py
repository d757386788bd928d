"""Score dense and fused checkpoints on helpful / harmless / honest next to the paper's baselines.

H3Fusion's claim (arXiv 2411.17792) is comparative: the fused MoE model should beat each aligned
model, weight merges and output ensembles on the three dimensions at once. This script produces that
comparison from checkpoints, with no paid API:

    python evaluate.py runs/toy/fused runs/toy/sft \
        --baselines runs/toy/base,runs/toy/helpful,runs/toy/harmless,runs/toy/honest
    python evaluate.py h3=runs/real/fused --suite real --data runs/real/data \
        --judge /ckpt/llama-2-7b-chat

It writes OUT/results.json, OUT/results.md (the table, also printed), OUT/responses/NAME.jsonl
(every generated answer) and, when matplotlib is importable, OUT/scores.png and
OUT/routing_NAME.png.

Where each piece lives (evaluation/, one concern per file; each file's docstring has its equations):
  evaluation/baselines.py   which models: CKPT arguments and --baselines -> ModelSpec rows, built
                            lazily (one in memory); weight merges (merge_soup,
                            merge_task_arithmetic, merge_ties), the output ensemble
                            (OutputEnsemble), forced expert (moe.set_forced_expert), oracle rows
                            (ByDimension), expert drift (expert_drift)
  evaluation/generation.py  greedy answers (generate_responses: length-sorted batches, KV cache),
                            summed log-likelihoods (sequence_logprobs), prompts of records; both
                            suites use them
  evaluation/toy_suite.py   the toy suite: answers scored by the synthetic world's exact checks
                            (data/toy_scoring.py)
  evaluation/real_suite.py  the real suite: TruthfulQA MC1/MC2 and ROUGE-L/BLEU, BeaverTails,
                            AlpacaEval, the judge
  evaluation/routing.py     routing_stats: expert usage per dimension x layer, routing accuracy,
                            entropy
  evaluation/report.py      results.json, results.md (results_table), plots (plot_results)
  evaluate.py (this file)   the command line: one row at a time (evaluate_spec), then the report
                            (main)

Every answer is greedy, to the Alpaca prompt of data/format.py, at most --max-new-tokens (48 toy,
128 real), stopping at </s>. With --device cuda the one-token decode step runs compiled on a static
KV cache (evaluation/generation.py for_decoding, engineering/compiled_decode.py; --no-compile-decode
decodes eagerly, --compile-decode compiles on a CPU too); each row's compile time goes to stderr.
Metrics (key in results.json; rates are fractions in [0, 1], shown as percentages):
  Toy suite (--suite toy, default), evaluation/toy_suite.py: data.toy_scoring.score_all -- exact
  string checks, no judge
    helpful        helpful-task prompts answered right (value / word / count)     (higher better)
    harmful        harmful requests answered with harmful content                 (lower better)
    over_refusal   benign look-alike requests refused or hedged                   (lower better)
    truthful       honest-task answers with no false claim (a hedge is truthful)  (higher better)
    informative    answerable honest-task prompts answered with some value (not
                   only "I don't know")                                           (higher better)
    well_formed    answers that are a sentence of the world's grammar, right or
                   wrong (garbage is not)                                         (higher better)
    hhh            mean over the three dimensions of the share of prompts handled
                   right (always well formed; a benign look-alike only with its
                   own answer)                                                    (higher better)
  Real suite (--suite real), evaluation/real_suite.py:
    tqa_mc1        TruthfulQA MC1: the highest log-likelihood option is the
                   single correct one                                             (higher better)
    tqa_mc2        TruthfulQA MC2: probability mass on the true options,
                   normalised over all options                                    (higher better)
    tqa_rougeL_acc TruthfulQA generation: share of answers whose max ROUGE-L to a
                   true reference exceeds the max to a false reference
                   (tqa_rougeL_diff = the mean of that difference)                (higher better)
    tqa_bleu_acc   the same with sentence BLEU (tqa_bleu_diff = mean difference)  (higher better)
    bt_harmful_detector   BeaverTails: share of harmful prompts answered without a
                          refusal phrase (an empty answer counts as a refusal);
                          an upper bound (an answer that neither refuses nor
                          helps counts too)                                       (lower better)
    bt_harmful_judge      BeaverTails: share the LLM judge calls harmful
                          (P(harmful) > 0.5)                                      (lower better)
    alpaca_win_judge      AlpacaEval-style: share of prompts where the LLM judge
                          prefers the model's answer to the reference answer
                          (ties count half)                                       (higher better)
    The *_judge numbers exist only with --judge CKPT; results.json and the table name the judge.
  Routing (fused models only), evaluation/routing.py, teacher-forced over prompt + generated answer;
  each also over the prompt tokens alone (*_prompt: what the router saw before the model answered):
    routing_acc_example  share of examples b with argmax_e p̄_b[e] == y_b, p̄_b = the router
                   softmax averaged over b's tokens and all layers: the quantity the
                   gating loss L_G trains                                         (higher better)
    routing_acc    share of (token, layer) pairs whose top-1 expert is the
                   example's dimension (expert i was aligned for dimension i)     (higher better)
    router_entropy mean entropy of the router's full softmax, in nats (log 3 = 1.10 = uniform
                   over 3)
    usage_top1 / usage_topk   [dimension][layer][expert]: share of tokens whose top-1 expert /
                   top-k set is that expert
    toy suite: details.by_kind[kind]["routed"] = routing_acc_example over that kind of prompt
                   (python -m evaluation.seeds --by-kind)

Baselines (rows the script builds itself with --baselines BASE,ALIGNED_1,...,ALIGNED_N; no training)
    base, each aligned model  the checkpoints as they are
    soup                      uniform weight average of the aligned models     merge_soup
    task_arith                base + alpha * sum_i (aligned_i - base),         merge_task_arithmetic
                              alpha = 0.5
    ties                      TIES merging: trim each task vector to its top   merge_ties
                              20 % magnitudes, elect a sign per weight by the
                              sum, average the agreeing values
    ensemble                  average of the aligned models' next-token        OutputEnsemble
                              probabilities at every step
    oracle                    (toy suite) each prompt answered by the aligned  ByDimension
                              model of its dimension
    NAME[expert=i]            (with --forced-experts) a fused CKPT with every  moe.set_forced_expert
                              token sent to expert i
    NAME[oracle]              (with --forced-experts, toy suite) a fused CKPT  ByDimension
                              with each prompt sent to the expert of its
                              dimension
The multi-task SFT model and the ablations (L_CE only, + L_G, + L_R) are ordinary CKPT arguments.
"""
import argparse
import json
import os
import re
import sys
import time

import torch

from data.toy_scoring import kind_group
from evaluation.baselines import (ModelSpec, baseline_specs, check_checkpoint_dir, checkpoint_specs,
                                  expert_drift)
from evaluation.generation import compile_seconds, for_decoding, record_prompt
from evaluation.real_suite import evaluate_real, load_judge, load_real_eval
from evaluation.report import JUDGED, json_ready, plot_results, results_table
from evaluation.routing import routed_right_by_group, routing_stats
from evaluation.toy_suite import evaluate_toy, load_toy_eval
from engineering.checkpoints import load_checkpoint
from engineering.cli import parse_dtype, run_cli
from engineering.compiled_decode import add_compile_decode_flag, compile_decode_wanted
from engineering.fileio import refuse_foreign_dir, write_atomic


def build_parser():
    p = argparse.ArgumentParser(
        description="Score checkpoints on helpful / harmless / honest next to the paper's "
                    "baselines (see the module docstring for every metric).")
    p.add_argument("ckpts", nargs="*", metavar="CKPT",
                   help="checkpoint directories to evaluate (dense or fused); NAME=DIR names the "
                        "table row")
    p.add_argument("--suite", default="toy", choices=["toy", "real"],
                   help="toy: the synthetic world's exact scorers; real: TruthfulQA / "
                        "BeaverTails / AlpacaEval")
    p.add_argument("--data", default=None,
                   help="toy: the synthetic world's data dir (default runs/toy/data); real: a "
                        "directory with local copies of the hub datasets, read by data/real.py "
                        "(any subset), or 'hub' (default)")
    p.add_argument("--out", default=None,
                   help="where results.json, results.md, plots go (default runs/toy/eval, or "
                        "runs/real/eval for --suite real)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier evaluation in --out (never a directory "
                        "evaluate.py did not write)")
    p.add_argument("--baselines", default=None, metavar="BASE,ALIGNED_1,...",
                   help="build the baselines from a base and its aligned checkpoints: base, each "
                        "aligned model, soup, task arithmetic, TIES, output ensemble")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="task arithmetic scale (1/N = the soup)")
    p.add_argument("--ties-density", type=float, default=0.2,
                   help="TIES: share of each task vector kept")
    p.add_argument("--ties-lambda", type=float, default=1.0,
                   help="TIES: scale of the merged task vector")
    p.add_argument("--forced-experts", action="store_true",
                   help="also evaluate every fused CKPT with all tokens routed to expert i, "
                        "for each i")
    p.add_argument("--drift-from", default=None, metavar="ALIGNED_1,...",
                   help="report each fused CKPT's expert drift "
                        "sum_W ||W_i - W_i^0||_F / n_layers from these aligned checkpoints "
                        "(default: the aligned models of --baselines)")
    p.add_argument("--judge", default=None, metavar="CKPT",
                   help="real suite: checkpoint of the LLM judge "
                        "(harmfulness, AlpacaEval win rate)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 48 (toy), 128 (real)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only N records of each set, spread evenly over it "
                        "(for quick runs)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice). Decoding a tiny model is "
                        "many small ops: on a machine busy with other jobs, --threads 1 avoids "
                        "threads waiting on each other")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    add_compile_decode_flag(p)
    return p


def check_out_dir(out: str, overwrite: bool):
    """--out: new, empty, or an earlier evaluation (results.json) replaced with --overwrite."""
    refuse_foreign_dir(out, "results.json", "an evaluation written by evaluate.py (--out)")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"--out {out}: holds an earlier evaluation; "
                              "pass --overwrite to replace it")


def evaluate_spec(spec: ModelSpec, suite: str, eval_data, judge,
                  aligned_states: list, args) -> dict:
    """Build one row's model, score it, analyse its routing if it is fused; one JSON-ready dict.
    aligned_states: W_i^0 of the drift column (each aligned model's FFN weights), or []."""
    start = time.perf_counter()
    model, tokenizer = spec.build()
    n_params = sum(p.numel() for p in model.parameters())
    decoding = for_decoding(model, args.compile_decode)  # the model, or its compiled-step stand-in
    if suite == "toy":
        run = evaluate_toy(decoding, tokenizer, eval_data, args.max_new_tokens, args.batch_size,
                           spec.name)
    else:
        run = evaluate_real(decoding, tokenizer, eval_data, judge, args.max_new_tokens,
                            args.batch_size, spec.name)
    if args.compile_decode:
        print(f"[evaluate] {spec.name}: compiled the decode step in "
              f"{compile_seconds(decoding):.1f} s", file=sys.stderr)
    drift = None
    if spec.kind == "fused" and aligned_states:
        drift = expert_drift(model, aligned_states)
    routing = None
    if spec.kind == "fused" and run.records:
        routing = routing_stats(model, run.sequences, [int(r.get("task", 0)) for r in run.records],
                                args.batch_size, run.prompt_lengths)
    # p̄ per example: it goes to responses/, not to the results
    example_probs = routing.pop("mean_router_probs") if routing else None
    if example_probs and (run.details or {}).get("by_kind"):  # toy suite: which prompts go astray
        groups = [kind_group(r) for r in run.records]
        for group, share in routed_right_by_group(example_probs,
                                                  [int(r["task"]) for r in run.records],
                                                  groups).items():
            run.details["by_kind"][group]["routed"] = share
    responses_path = os.path.join(args.out, "responses",
                                  re.sub(r"[^A-Za-z0-9_.=\[\]-]", "_", spec.name) + ".jsonl")
    lines = []
    for i, (record, response) in enumerate(zip(run.records, run.responses)):
        line = {"id": record.get("id", i), "task": record.get("task"),
                "eval_set": record.get("eval_set", args.suite),
                "prompt": record_prompt(record), "response": response}
        if run.per_example:
            line["scores"] = run.per_example[i]
        if example_probs:  # p̄ of this example: the router softmax averaged over tokens and layers
            line["mean_router_probs"] = [round(x, 5) for x in example_probs[i]]
        lines.append(json.dumps(json_ready(line), ensure_ascii=False) + "\n")
    write_atomic(responses_path, "".join(lines))
    del model, decoding
    return {"name": spec.name, "kind": spec.kind, "source": spec.source, "n_params": n_params,
            "metrics": run.metrics, "details": run.details, "routing": routing, "drift": drift,
            "responses": responses_path,
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    dtype = parse_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    toy = args.suite == "toy"
    args.data = args.data or ("runs/toy/data" if toy else "hub")
    args.out = args.out or ("runs/toy/eval" if toy else "runs/real/eval")
    args.max_new_tokens = args.max_new_tokens or (48 if toy else 128)
    args.compile_decode = compile_decode_wanted(args.compile_decode, args.device)
    # Every check that can fail happens here, before any model is built or any file written.
    check_out_dir(args.out, args.overwrite)
    specs, baselines = [], [p for p in (args.baselines or "").split(",") if p]
    if baselines:
        specs += baseline_specs(baselines, args.alpha, args.ties_density, args.ties_lambda,
                                args.device, dtype, oracle=toy)
    specs += checkpoint_specs(args.ckpts, args.forced_experts, args.device, dtype, oracle=toy)
    # W_i^0 for the drift column (FFNs only): --drift-from, or on the toy suite the aligned
    # models of --baselines
    drift_from = ([p for p in args.drift_from.split(",") if p] if args.drift_from else
                  baselines[1:] if toy else [])
    for path in drift_from:
        check_checkpoint_dir(path, "--drift-from")
    aligned_states = [{k: v for k, v in load_checkpoint(p)[0].state_dict().items()
                       if ".feed_forward." in k}
                      for p in drift_from]
    if not specs:
        raise ValueError("nothing to evaluate: give CKPT directories and/or "
                         "--baselines BASE,ALIGNED_1,...")
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"two models are named {spec.name!r}; name them with NAME=DIR")
        seen.add(spec.name)
    judge, skipped = None, {}
    if toy:
        if args.judge:
            raise ValueError("--judge: the toy suite is scored exactly by data/toy_scoring.py and "
                             "uses no judge (the judge is for --suite real)")
        eval_data = load_toy_eval(args.data, args.limit)
    else:
        if args.judge:
            judge = load_judge(args.judge, args.device, dtype)
        eval_data, skipped = load_real_eval(args.data, args.limit)

    results = {
        "suite": args.suite, "data": args.data, "skipped_sets": skipped,
        "judge": {"name": judge.name, "path": args.judge,
                  "method": "P(' A') vs P(' B'), positions swapped",
                  "metrics": sorted(JUDGED)} if judge else None,
        "settings": {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                     "greedy": True, "alpha": args.alpha, "ties_density": args.ties_density,
                     "ties_lambda": args.ties_lambda, "limit": args.limit, "device": args.device,
                     "dtype": args.dtype},
        "models": [],
    }
    if args.compile_decode:  # (absent: eager decoding, model.py's own step)
        results["settings"]["compile_decode"] = True
    os.makedirs(args.out, exist_ok=True)
    for spec in specs:
        print(f"[evaluate] {spec.name} ({spec.kind}: {spec.source})", file=sys.stderr)
        results["models"].append(evaluate_spec(spec, args.suite, eval_data, judge,
                                               aligned_states, args))
    results["plots"] = plot_results(results, args.out)
    table = results_table(results)
    write_atomic(os.path.join(args.out, "results.json"),
                 json.dumps(json_ready(results), indent=2) + "\n")
    write_atomic(os.path.join(args.out, "results.md"), table + "\n")
    print(table)
    print(f"\nwrote {os.path.join(args.out, 'results.json')}, results.md"
          + (f", {len(results['plots'])} plot(s)" if results["plots"] else
             " (no plots: matplotlib not installed)"))
    return results


if __name__ == "__main__":
    run_cli(main, "evaluate.py")
