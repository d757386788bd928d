"""Data for H3Fusion: the Alpaca prompt format, the real alignment datasets, and a synthetic world.

    data/__init__.py     the task names and labels shared by every file below (imports nothing:
                         `import data` stays free of torch, so pipeline.py can read TASK_NAMES
                         cheaply)
    data/records.py      load_records(name, toy_dir, split) -> list of
                         {"instruction", "input", "output", "task"}: every training and evaluation
                         set by name, the pooled mixtures (balance_by_task)
    data/format.py       records -> token ids with the loss mask, batches (encode_example, collate)
    data/show.py         `python -m data.show runs/toy/data`:
                         training examples with the loss mask visible
    data/streams.py      what a training step reads: example streams, packed pretraining text
    data/toy.py          the synthetic helpful/harmless/honest world: generator, files,
                         `python -m data.toy`
    data/toy_tables.py   its fixed word lists and templates
    data/toy_scoring.py  its exact scorers (score_all)
    data/real.py         Alpaca-Small, BeaverTails, TruthfulQA, AlpacaEval
                         from the hub or a local copy
    data/tokenizer.py    a LLaMA-style sentencepiece tokenizer trainer

Imports flow one way: every file may import this one; toy imports toy_tables, format and tokenizer;
toy_scoring imports toy_tables; records imports format, real and toy;
show and streams import records.
The synthetic world's pretraining documents: data.toy.load_corpus_documents(toy_dir).
"""
# the alignment dimensions: task label i, expert i, synthetic set i
TASK_NAMES = ("helpful", "harmless", "honest")
REAL_NAMES = {  # accepted spellings -> canonical name in data.real
    "alpaca_small": "alpaca_small", "alpaca": "alpaca_small", "beavertails": "beavertails",
    "truthfulqa": "truthfulqa", "truthful_qa": "truthfulqa", "alpaca_eval": "alpaca_eval",
    "truthfulqa_mc": "truthfulqa_mc", "real_pooled": "real_pooled",
}
TASK_OF_REAL = {"alpaca_small": 0, "beavertails": 1, "truthfulqa": 2}
TASK_IDS = {name: i for i, name in enumerate(TASK_NAMES)}
