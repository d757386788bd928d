"""What evaluate.py computes, one concern per module (evaluate.py is the command line that ties them
together):

    baselines.py    which models: checkpoints and the paper's baselines (merges, ensemble, forced
                    expert, oracle)
    generation.py   greedy answers and log-likelihoods, batched (both suites)
    toy_suite.py    the synthetic world's exact scorers (data/toy_scoring.py) on a model's answers
    real_suite.py   TruthfulQA MC1/MC2, ROUGE-L/BLEU, BeaverTails, AlpacaEval, the LLM judge
    routing.py      routing analysis of a fused model
    report.py       results.json, results.md, plots
"""
