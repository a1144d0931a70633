"""Training the tiny hybrid-thinking Qwen3: the tasks, the data of each stage, and the trainer.

``qwen3 train`` and ``python -m qwen3.train`` run :func:`qwen3.train.command.run` (``--stage sft`` is :mod:`qwen3.train.trainer`,
``grpo`` :mod:`qwen3.train.grpo`, ``distill`` :mod:`qwen3.train.distill`).
"""
