"""Tensor-parallel serving on torch.distributed: the shard plan, the collectives, the worker processes.

Rank 0 is the process that made the ``LLM``: it owns the scheduler and the engine and samples. It spawns
ranks 1..N-1 (``torch.multiprocessing``, spawn), which load only their slices of the checkpoint, build the
same ``ModelRunner`` and then loop: every step rank 0 broadcasts the step's host-side inputs (token ids,
positions, slots, block tables, the rows to compute logits for) and every rank runs the model on its
shard, in lockstep, meeting at the all-reduces inside it. gloo on CPU, NCCL on CUDA (same code).

Where the model splits (Megatron's plan, as vLLM's): q/k/v and gate/up are column-parallel (each rank has
its heads and its slice of the intermediate size), o_proj and down_proj row-parallel with one all-reduce
each, the embedding and lm_head vocab-parallel (the embedding all-reduces the rows each rank looked up,
the lm_head all-gathers the logits). When N exceeds the KV heads, each KV head is replicated on N / Hkv
ranks. Norms are replicated.

Two process groups: the default one carries rank 0's commands and waits as long as the server idles;
the model's collectives run on their own group with a short timeout, so a rank that stalls is an error,
never a hang. Before each step rank 0 also checks that its workers are alive.
"""

from __future__ import annotations

import logging
import multiprocessing.process
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qwen3.config import Qwen3Config

logger = logging.getLogger(__name__)

COMMAND_TIMEOUT = timedelta(days=30)  # workers wait this long for rank 0's next step (an idle server)
COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # a collective inside the model: past this a rank is stuck


class ParallelError(RuntimeError):
    """A rank died, stalled or failed: the engine stops (the step cannot be retried without it)."""


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the tensor-parallel group and the slices of the model it holds."""

    rank: int
    size: int
    config: Qwen3Config
    group: Any = None  # the model collectives' process group (None: the default one)

    def __post_init__(self) -> None:
        c, n = self.config, self.size
        problems = []
        if c.is_moe:
            problems.append("MoE checkpoints are not supported yet (dense Qwen3 only)")
        if c.num_attention_heads % n:
            problems.append(f"num_attention_heads {c.num_attention_heads} does not divide by it")
        kv = c.num_key_value_heads
        if kv % n and n % kv:
            problems.append(f"num_key_value_heads {kv} neither divides by it nor divides it")
        if c.intermediate_size % n:
            problems.append(f"intermediate_size {c.intermediate_size} does not divide by it")
        if c.vocab_size % n:
            problems.append(f"vocab_size {c.vocab_size} does not divide by it")
        if problems:
            raise ValueError(f"tensor_parallel_size {n}: " + "; ".join(problems))

    # --- the shard plan ------------------------------------------------------------------------------

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads // self.size

    @property
    def num_kv_heads(self) -> int:
        """KV heads held here: Hkv / N, or one (replicated) when N exceeds Hkv."""
        return max(self.config.num_key_value_heads // self.size, 1)

    @property
    def first_kv_head(self) -> int:
        kv = self.config.num_key_value_heads
        return self.rank * kv // self.size if self.size > kv else self.rank * self.num_kv_heads

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size // self.size

    @property
    def vocab_shard(self) -> tuple[int, int]:
        """[start, stop) of the vocabulary rows held here (embedding and lm_head)."""
        part = self.config.vocab_size // self.size
        return self.rank * part, (self.rank + 1) * part

    def checkpoint_slice(self, name: str) -> tuple[slice, ...] | None:
        """The part of checkpoint tensor ``name`` this rank loads (None: all of it, replicated)."""
        d = self.config.head_dim
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (slice(*self.vocab_shard),)
        q = slice(self.rank * self.num_heads * d, (self.rank + 1) * self.num_heads * d)
        kv = slice(self.first_kv_head * d, (self.first_kv_head + self.num_kv_heads) * d)
        i = slice(self.rank * self.intermediate_size, (self.rank + 1) * self.intermediate_size)
        suffix = name.rsplit(".", 3)
        module = ".".join(suffix[-3:-1])  # e.g. "self_attn.q_proj"
        table = {
            "self_attn.q_proj": (q,),
            "self_attn.k_proj": (kv,),
            "self_attn.v_proj": (kv,),
            "mlp.gate_proj": (i,),
            "mlp.up_proj": (i,),
        }
        if module in table:
            return table[module]
        if module in ("self_attn.o_proj", "mlp.down_proj") and name.endswith(".weight"):
            return (slice(None), q if module == "self_attn.o_proj" else i)
        return None  # norms, o_proj's bias (added once, after the all-reduce)

    # --- collectives ---------------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's partial ``x`` (row-parallel layers, the vocab-parallel embedding)."""
        try:
            dist.all_reduce(x, group=self.group)
        except RuntimeError as exc:
            raise ParallelError(
                f"rank {self.rank}: all-reduce failed (a rank died or stalled): {exc}"
            ) from exc
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated along the last dimension, in rank order (the logits)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        try:
            dist.all_gather(parts, x.contiguous(), group=self.group)
        except RuntimeError as exc:
            raise ParallelError(
                f"rank {self.rank}: all-gather failed (a rank died or stalled): {exc}"
            ) from exc
        return torch.cat(parts, dim=-1)

    def embed(self, embedding: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: each rank embeds the ids in its shard (zeros elsewhere), then one sum."""
        start, stop = self.vocab_shard
        inside = (ids >= start) & (ids < stop)
        rows = embedding((ids - start) * inside)
        return self.all_reduce(rows * inside.unsqueeze(-1).to(rows.dtype))


# --- processes -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(rank: int, size: int, init_method: str, backend: str) -> Any:
    """Join the default group (commands) and create the model's collectives group."""
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=size, timeout=COMMAND_TIMEOUT
    )
    return dist.new_group(list(range(size)), timeout=COLLECTIVE_TIMEOUT, backend=backend)


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters (tied ones once): what this rank holds resident for the weights."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _gather_int(value: int, device: str | torch.device) -> list[int]:
    """Every rank's ``value`` in rank order, as one int64 tensor per rank (nothing pickled)."""
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [int(part.item()) for part in parts]


def _worker_main(
    rank: int, size: int, init_method: str, backend: str, source: str, dtype: Any, device: str
) -> None:
    """A worker rank: load its shard, build the runner rank 0 asks for, run every step it is sent."""
    from qwen3.checkpoint import load_config, load_model
    from qwen3.engine.model_runner import ModelRunner
    from qwen3.hub import resolve_model_dir

    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    if device.startswith("cuda"):  # one GPU per rank (rank 0 keeps the device it was given)
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    group = _init_group(rank, size, init_method, backend)
    folder = resolve_model_dir(source)
    tp = TensorParallel(rank, size, load_config(folder), group)
    model = load_model(folder, dtype=dtype, device=device, progress=False, tp=tp)
    model.use_cpu_kernels()
    runner: ModelRunner | None = None
    with torch.inference_mode():
        while (command := _broadcast(None)) is not None:
            kind, payload = command
            if kind == "runner":
                runner = ModelRunner(model, **payload)
            elif kind == "step":
                runner.execute(payload)
            elif kind == "parameter_bytes":
                _gather_int(parameter_bytes(model), device)
    dist.destroy_process_group()


class Workers:
    """Rank 0's side: the spawned worker processes and the command channel to them."""

    def __init__(self, size: int, source: str, dtype: Any, device: torch.device) -> None:
        if dist.is_initialized():
            raise ParallelError("torch.distributed is already initialised in this process; one LLM with "
                                "tensor_parallel_size > 1 per process")  # fmt: skip
        backend = "nccl" if device.type == "cuda" else "gloo"
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.get_context("spawn")
        self.size = size
        self.device = device  # rank 0's: where its side of a collective's tensors live (NCCL: a GPU)
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for rank in range(1, size):
            proc = context.Process(
                target=_worker_main, args=(rank, size, init_method, backend, source, dtype, str(device)),
                name=f"qwen3-tp-rank{rank}", daemon=True,
            )  # fmt: skip
            proc.start()
            self.processes.append(proc)
        self.group = _init_group(0, size, init_method, backend)
        self.closed = False
        logger.info("tensor parallel: %d ranks over %s (%s)", size, backend, init_method)

    def check_alive(self) -> None:
        """Raise :class:`ParallelError` naming the first worker that has exited."""
        dead = self.who_died(wait=0.0)
        if dead:
            raise ParallelError(dead)

    def who_died(self, wait: float = 1.0) -> str:
        """Which worker has exited ("" if none), waiting up to ``wait`` s for one to be reaped: a collective
        can fail on a reset connection before the dead rank's process is gone, and the error should still
        say which rank it was."""
        deadline = time.monotonic() + wait
        while True:
            for rank, proc in enumerate(self.processes, start=1):
                if not proc.is_alive():
                    return f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
            if time.monotonic() >= deadline:
                return ""
            time.sleep(0.01)

    def send(self, kind: str, payload: Any) -> None:
        """Broadcast a command every worker runs in lockstep with this process."""
        if self.closed:
            raise ParallelError("the tensor-parallel workers were shut down")
        self.check_alive()
        try:
            _broadcast((kind, payload))
        except RuntimeError as exc:
            who = self.who_died() or "no rank has exited"
            raise ParallelError(
                f"sending {kind!r} to the tensor-parallel workers failed ({who}): {exc}"
            ) from exc

    def parameter_bytes(self, model: torch.nn.Module) -> list[int]:
        """Resident weight bytes of every rank, rank 0's (``model``, its shard) first: the proof that each
        rank holds about 1/N of the model, asked of the workers themselves rather than assumed."""
        self.send("parameter_bytes", None)
        try:
            return _gather_int(parameter_bytes(model), self.device)
        except RuntimeError as exc:
            who = self.who_died() or "no rank has exited"
            raise ParallelError(f"gathering the ranks' parameter bytes failed ({who}): {exc}") from exc

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (they leave their loop), wait for them, leave the process group."""
        if self.closed:
            return
        self.closed = True
        try:
            if all(p.is_alive() for p in self.processes):
                _broadcast(None)
        except RuntimeError:
            logger.warning("could not tell the tensor-parallel workers to stop; terminating them")
        for proc in self.processes:
            proc.join(timeout)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout)
        dist.destroy_process_group()
