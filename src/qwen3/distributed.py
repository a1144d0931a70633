"""Tensor- and expert-parallel serving on torch.distributed: the shard plan, the collectives, the ranks.

Rank 0 is the process that made the ``LLM``: it owns the scheduler and the engine and samples. It spawns
ranks 1..N-1 (``torch.multiprocessing``, spawn), or finds them started by a launcher (``torchrun``, on this
machine or others), which load only their slices of the checkpoint, build the same ``ModelRunner`` and then
loop: every step rank 0 broadcasts the step's host-side inputs (token ids, positions, slots, block tables,
the rows to compute logits for; JSON and raw tensor bytes, never pickle) and every rank runs the model on
its shard, in lockstep, meeting at the all-reduces inside it. gloo on CPU, NCCL on CUDA (same code).

Where the model splits (Megatron's plan, as vLLM's): q/k/v and gate/up are column-parallel (each rank has
its heads and its slice of the intermediate size), o_proj and down_proj row-parallel with one all-reduce
each, the embedding and lm_head vocab-parallel (the embedding all-reduces the rows each rank looked up,
the lm_head all-gathers the logits). When N exceeds the KV heads, each KV head is replicated on N / Hkv
ranks. Norms and the MoE router are replicated; MoE experts are sliced like the dense MLP, or, with expert
parallel, placed whole, E / N a rank; either way one all-reduce sums the ranks' expert outputs.

Two process groups: the default one carries rank 0's commands and waits as long as the server idles;
the model's collectives run on their own group with a short timeout, so a rank that stalls is an error,
never a hang. Before each step rank 0 also checks that its workers are alive (launcher-started ones are
pinged while idle).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing.process
import os
import re
import socket
import threading
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
_EXPERT_TENSOR = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight")


class ParallelError(RuntimeError):
    """A rank died, stalled or failed: the engine stops (the step cannot be retried without it)."""


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the tensor-parallel group and the slices of the model it holds.

    ``expert_parallel`` (MoE): each rank holds E / N whole experts instead of a 1/N slice of every expert.
    """

    rank: int
    size: int
    config: Qwen3Config
    group: Any = None  # the model collectives' process group (None: the default one)
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        c, n = self.config, self.size
        problems = []
        if c.num_attention_heads % n:
            problems.append(f"num_attention_heads {c.num_attention_heads} does not divide by it")
        kv = c.num_key_value_heads
        if kv % n and n % kv:
            problems.append(f"num_key_value_heads {kv} neither divides by it nor divides it")
        dense_layers = any(not c.is_sparse_layer(i) for i in range(c.num_hidden_layers))
        if dense_layers and c.intermediate_size % n:
            problems.append(f"intermediate_size {c.intermediate_size} does not divide by it")
        if self.expert_parallel and not c.is_moe:
            problems.append("expert parallel needs a MoE checkpoint (this one is dense)")
        elif self.expert_parallel and c.num_experts % n:
            problems.append(f"num_experts {c.num_experts} does not divide by it (expert parallel)")
        elif c.is_moe and not self.expert_parallel and c.moe_intermediate_size % n:
            problems.append(
                f"moe_intermediate_size {c.moe_intermediate_size} does not divide by it "
                f"(--enable-expert-parallel places whole experts instead)"
            )
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

    @property
    def local_experts(self) -> range:
        """The global ids of the experts held here: a contiguous E / N under expert parallel (vLLM's linear
        placement), else all of them (each sliced to ``moe_intermediate_size``)."""
        e = self.config.num_experts
        if not self.expert_parallel:
            return range(e)
        part = e // self.size
        return range(self.rank * part, (self.rank + 1) * part)

    @property
    def expert_map(self) -> list[int]:
        """Global expert id -> its index among this rank's experts, -1 where another rank holds it."""
        local = self.local_experts
        return [e - local.start if e in local else -1 for e in range(self.config.num_experts)]

    @property
    def moe_intermediate_size(self) -> int:
        """Each held expert's intermediate size: whole under expert parallel, else its 1/N slice."""
        m = self.config.moe_intermediate_size
        return m if self.expert_parallel else m // self.size

    def holds(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` has a part on this rank (an expert of another rank: not)."""
        match = _EXPERT_TENSOR.fullmatch(name)
        return match is None or int(match.group(2)) in self.local_experts

    def checkpoint_slice(self, name: str) -> tuple[slice, ...] | None:
        """The part of checkpoint tensor ``name`` this rank loads (None: all of it, replicated)."""
        d = self.config.head_dim
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (slice(*self.vocab_shard),)
        if (match := _EXPERT_TENSOR.fullmatch(name)) is not None:
            if self.expert_parallel:
                return None  # whole experts (and :meth:`holds` says which)
            return self.expert_slice(match.group(3))[1:]
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
        return None  # norms, the router, o_proj's bias (added once, after the all-reduce)

    def expert_slice(self, projection: str) -> tuple[slice, ...]:
        """This rank's part of a stack of every expert's ``projection`` weight ([E, out, in], as GGUF stores
        it): its experts under expert parallel, else gate/up rows or down columns of each."""
        local = self.local_experts
        experts = slice(local.start, local.stop)
        if self.expert_parallel:
            return (experts,)
        m = self.moe_intermediate_size
        part = slice(self.rank * m, (self.rank + 1) * m)
        return (experts, part) if projection in ("gate_proj", "up_proj") else (experts, slice(None), part)

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


# --- the command channel: rank 0's commands as JSON and raw tensor bytes (never pickled) -----------------

_WIRE_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32)
}


def _wire_types() -> dict[str, type]:
    """The dataclasses a command may carry (a step's inputs); nothing else is ever built from the wire."""
    from qwen3.engine.attention import AttentionMetadata, RowMetadata
    from qwen3.engine.model_runner import StepInputs

    return {t.__name__: t for t in (StepInputs, AttentionMetadata, RowMetadata)}


def encode_command(kind: str, payload: Any) -> torch.Tensor:
    """``(kind, payload)`` as one uint8 tensor: the JSON structure (8-byte padded), then the bytes of every
    tensor in it. Payloads hold None, bools, numbers, strings, lists, str-keyed dicts, CPU tensors and the
    step dataclasses of :func:`_wire_types`; a worker rebuilds them without running any code from the wire
    (pickle would: a command channel over the network must not be one)."""
    types = _wire_types()
    chunks: list[torch.Tensor] = []
    size = 0

    def walk(obj: Any) -> Any:
        nonlocal size
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, (list, tuple)):
            return [walk(item) for item in obj]
        if isinstance(obj, dict):
            return {"dict": {str(k): walk(v) for k, v in obj.items()}}
        if isinstance(obj, torch.Tensor):
            data = obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            ref = {"tensor": [size, str(obj.dtype).removeprefix("torch."), list(obj.shape)]}
            chunks.append(data)
            size += -(-data.numel() // 8) * 8
            if data.numel() % 8:
                chunks.append(torch.zeros(-data.numel() % 8, dtype=torch.uint8))
            return ref
        if type(obj).__name__ in types and dataclasses.is_dataclass(obj):
            fields = {f.name: walk(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
            return {"dataclass": type(obj).__name__, "fields": fields}
        raise TypeError(f"a tensor-parallel command cannot carry {type(obj).__name__}")

    text = json.dumps({"kind": kind, "payload": walk(payload)}).encode()
    head = torch.frombuffer(bytearray(text + b" " * (-len(text) % 8)), dtype=torch.uint8)
    return torch.cat([torch.tensor([head.numel()], dtype=torch.int64).view(torch.uint8), head, *chunks])


def decode_command(data: torch.Tensor) -> tuple[str, Any]:
    """The inverse of :func:`encode_command`; a malformed command raises :class:`ParallelError`."""
    types = _wire_types()
    try:
        head = int(data[:8].view(torch.int64)[0])
        command = json.loads(bytes(data[8 : 8 + head].tolist()))
        blob = data[8 + head :]

        def build(obj: Any) -> Any:
            if isinstance(obj, list):
                return [build(item) for item in obj]
            if not isinstance(obj, dict):
                return obj
            if "dict" in obj:
                return {k: build(v) for k, v in obj["dict"].items()}
            if "tensor" in obj:
                offset, dtype, shape = obj["tensor"]
                dtype = _WIRE_DTYPES[dtype]
                count = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                if not 0 <= offset <= offset + count <= blob.numel():
                    raise ValueError(f"a tensor at {offset} of {count} bytes is outside the command")
                return blob[offset : offset + count].clone().view(dtype).reshape(shape)
            cls = types[obj["dataclass"]]
            return cls(**{k: build(v) for k, v in obj["fields"].items()})

        return command["kind"], build(command["payload"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ParallelError(f"malformed tensor-parallel command: {type(exc).__name__}: {exc}") from exc


def _send_command(kind: str, payload: Any) -> None:
    data = encode_command(kind, payload)
    dist.broadcast(torch.tensor([data.numel()], dtype=torch.int64), src=0)
    dist.broadcast(data, src=0)


def _receive_command() -> tuple[str, Any]:
    size = torch.empty(1, dtype=torch.int64)
    dist.broadcast(size, src=0)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return decode_command(data)


# --- processes -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_rank() -> int | None:
    """This process's rank when a launcher started it (``torchrun``, or the env:// variables by hand:
    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), else None: qwen3 then spawns the ranks itself."""
    if all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return int(os.environ["RANK"])
    return None


def _check_launch(size: int) -> None:
    world = int(os.environ["WORLD_SIZE"])
    if world != size:
        raise ParallelError(
            f"tensor_parallel_size {size} but the launcher started {world} processes (WORLD_SIZE); "
            f"start one process per rank (torchrun --nnodes * --nproc-per-node = {size})"
        )


def _init_group(rank: int, size: int, init_method: str, backend: str) -> Any:
    """Join the default group (commands: host-side bytes over gloo, whatever the device) and create the
    model's collectives group (gloo on CPU, NCCL on CUDA)."""
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=size, timeout=COMMAND_TIMEOUT
    )
    return dist.new_group(list(range(size)), timeout=COLLECTIVE_TIMEOUT, backend=backend)


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters (tied ones once): what this rank holds resident for the weights."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _gather_int(value: int) -> list[int]:
    """Every rank's ``value`` in rank order, as one int64 tensor per rank."""
    mine = torch.tensor([value], dtype=torch.int64)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [int(part.item()) for part in parts]


def local_ranks(size: int) -> int:
    """Ranks sharing this machine (its cores, its RAM): all of them when qwen3 spawned them."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", size)) if launched_rank() is not None else size


def rank_device(device: str | torch.device, rank: int) -> torch.device:
    """The device rank ``rank`` runs on: one GPU per rank on a machine (LOCAL_RANK under a launcher)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", rank)) if launched_rank() is not None else rank
    return torch.device("cuda", local)


def _worker_main(
    rank: int, size: int, init_method: str, backend: str, source: str, dtype: Any, device: str,
    expert_parallel: bool,
) -> None:  # fmt: skip
    """A worker rank: load its shard, build the runner rank 0 asks for, run every step it is sent."""
    from qwen3.checkpoint import load_config, load_model
    from qwen3.engine.model_runner import ModelRunner
    from qwen3.gguf_checkpoint import GGUFCheckpoint, is_gguf, resolve_gguf
    from qwen3.hub import resolve_model_dir

    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks(size)))
    where = rank_device(device, rank)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    group = _init_group(rank, size, init_method, backend)
    if is_gguf(source):
        path = resolve_gguf(source)
        source, config = str(path), GGUFCheckpoint(path).config()
    else:
        folder = resolve_model_dir(source)
        source, config = str(folder), load_config(folder)
    tp = TensorParallel(rank, size, config, group, expert_parallel)
    model = load_model(source, dtype=dtype, device=where, progress=False, tp=tp)
    model.use_cpu_kernels()
    runner: ModelRunner | None = None
    with torch.inference_mode():
        while (command := _receive_command())[0] != "stop":
            kind, payload = command
            if kind == "runner":
                runner = ModelRunner(model, **payload)
            elif kind == "step":
                runner.execute(payload)
            elif kind == "parameter_bytes":
                _gather_int(parameter_bytes(model))
    dist.destroy_process_group()


def serve_rank(size: int, source: str, dtype: Any, device: str, expert_parallel: bool) -> None:
    """Run this launcher-started process as worker rank RANK (> 0) until rank 0 stops: the ``torchrun``
    path, where every machine runs the same ``qwen3 serve`` and only rank 0 serves."""
    rank = launched_rank()
    if rank is None or rank == 0:
        raise ParallelError("serve_rank is for the launcher's ranks > 0")
    _check_launch(size)
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    logger.info("tensor parallel: rank %d of %d, waiting for rank 0's steps", rank, size)
    _worker_main(rank, size, "env://", backend, source, dtype, device, expert_parallel)


class Workers:
    """Rank 0's side: the other ranks (spawned here, or started by a launcher) and the command channel."""

    PING_INTERVAL = 1.0  # seconds idle before rank 0 checks launcher-started ranks with an empty command

    def __init__(
        self, size: int, source: str, dtype: Any, device: torch.device, expert_parallel: bool = False
    ) -> None:
        if dist.is_initialized():
            raise ParallelError("torch.distributed is already initialised in this process; one LLM with "
                                "tensor_parallel_size > 1 per process")  # fmt: skip
        backend = "nccl" if device.type == "cuda" else "gloo"
        self.size = size
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.launched = launched_rank() is not None  # the other ranks are not our children
        self._lock = threading.Lock()  # one command at a time, whichever thread sends it
        self._last_command = time.monotonic()
        if self.launched:
            _check_launch(size)
            init_method = "env://"
        else:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            context = mp.get_context("spawn")
            for rank in range(1, size):
                proc = context.Process(
                    target=_worker_main,
                    args=(rank, size, init_method, backend, source, dtype, str(device), expert_parallel),
                    name=f"qwen3-tp-rank{rank}", daemon=True,
                )  # fmt: skip
                proc.start()
                self.processes.append(proc)
        self.group = _init_group(0, size, init_method, backend)
        self.closed = False
        logger.info("tensor parallel: %d ranks over %s (%s)", size, backend, init_method)

    def check_alive(self) -> None:
        """Raise :class:`ParallelError` naming the first worker that has exited. Launcher-started ranks
        (maybe on other machines) are asked instead: an empty command every ``PING_INTERVAL`` idle seconds
        fails once one has gone."""
        dead = self.who_died(wait=0.0)
        if dead:
            raise ParallelError(dead)
        if self.launched and time.monotonic() - self._last_command > self.PING_INTERVAL:
            self.send("ping", None)

    def who_died(self, wait: float = 1.0) -> str:
        """Which worker has exited ("" if none), waiting up to ``wait`` s for one to be reaped: a collective
        can fail on a reset connection before the dead rank's process is gone, and the error should still
        say which rank it was. Launcher-started ranks are not ours to watch: ""."""
        deadline = time.monotonic() + wait
        while self.processes:
            for rank, proc in enumerate(self.processes, start=1):
                if not proc.is_alive():
                    return f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        return ""

    def _failed(self, what: str, exc: BaseException) -> ParallelError:
        who = self.who_died() or (
            "a launcher-started rank failed or left" if self.launched else "no rank has exited"
        )
        return ParallelError(f"{what} failed ({who}): {exc}")

    def send(self, kind: str, payload: Any) -> None:
        """Broadcast a command every worker runs in lockstep with this process."""
        with self._lock:
            if self.closed:
                raise ParallelError("the tensor-parallel workers were shut down")
            dead = self.who_died(wait=0.0)
            if dead:
                raise ParallelError(dead)
            try:
                _send_command(kind, payload)
            except RuntimeError as exc:
                raise self._failed(f"sending {kind!r} to the tensor-parallel workers", exc) from exc
            self._last_command = time.monotonic()

    def parameter_bytes(self, model: torch.nn.Module) -> list[int]:
        """Resident weight bytes of every rank, rank 0's (``model``, its shard) first: the proof that each
        rank holds about 1/N of the model, asked of the workers themselves rather than assumed."""
        self.send("parameter_bytes", None)
        try:
            return _gather_int(parameter_bytes(model))
        except RuntimeError as exc:
            raise self._failed("gathering the ranks' parameter bytes", exc) from exc

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (they leave their loop), wait for them, leave the process group."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                if all(p.is_alive() for p in self.processes):
                    _send_command("stop", None)
            except RuntimeError:
                logger.warning("could not tell the tensor-parallel workers to stop; terminating them")
        for proc in self.processes:
            proc.join(timeout)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout)
        dist.destroy_process_group()
