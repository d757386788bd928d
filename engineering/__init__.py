"""The engineering that runs the method for real, kept apart from the method a student reads.

The method lives at the top level (model.py, moe.py, losses.py, trainer.py, fusion.py) and never
imports this folder; the scripts (train_expert.py, fuse.py, evaluate.py, ...) do. What is here: the
command-line conventions and flag checks (cli.py), checkpoint files read strictly and written
atomically (checkpoints.py, hf_checkpoint.py, fileio.py), one process or FSDP2 over torchrun's
ranks (distributed.py), a training run's directory and resumable state (rundir.py), LoRA
(lora.py), the memory-lean sharded build of the fused model (lean_fusion.py), and a random tiny
checkpoint for tests and demos (tiny.py).
"""
