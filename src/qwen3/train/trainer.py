"""``qwen3 train``: the tiny hybrid-thinking Qwen3, from a seed to a Hugging Face folder.

The model is the inference code's own :class:`~qwen3.model.Qwen3ForCausalLM` (QK-norm and all), fed
micro-batches of samples of similar length (:mod:`qwen3.train.data`), right-padded. One run:

1. trains a byte-level BPE on the corpus (Qwen3's special tokens on top),
2. stage 1, cold start on worked solutions, for ``stage1_steps`` steps,
3. stage 2, Thinking Mode Fusion, until ``stage3_from``, then stage 3, the same in broader phrasings
   (general), until ``stage4_from``, then stage 4, wider phrasings and more tool use (agent), until
   ``stage5_from``, then stage 5, other languages, off-skill questions and large tool results (polish),
   until ``stage6_from``, then stage 6, the same in composed phrasings (breadth), until ``steps``,
4. writes config.json, model.safetensors, the tokenizer with the official chat template and
   generation_config.json — a folder ``qwen3.load_model`` and transformers both load.

Reproducible: weights start from ``seed`` and a step's data is a function of (seed, step), so a run
resumed from a checkpoint continues exactly as if it had not stopped, and data parallelism over
``torchrun`` processes splits the same global batch (each rank takes every world-size-th sample, and
the loss is normalised by the global number of target tokens, so the gradient is the one-process
gradient). Checkpoints are safetensors and JSON only — never pickles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from qwen3.checkpoint import save_model
from qwen3.config import Qwen3Config
from qwen3.model import Qwen3ForCausalLM
from qwen3.tokenizer import Tokenizer
from qwen3.train import data

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that determines a run. Saved with every checkpoint; a resumed run must match it."""

    seed: int = field(default=0, metadata={"help": "weights, tokenizer and data all follow from it"})
    steps: int = field(default=6200, metadata={"help": "optimizer steps in all"})
    stage1_steps: int = field(
        default=250, metadata={"help": "of those, cold-start steps on worked solutions"}
    )
    stage3_from: int = field(
        default=2000, metadata={"help": "first step of stage 3, Thinking Mode Fusion in broader phrasings"}
    )
    stage4_from: int = field(
        default=3700, metadata={"help": "first step of stage 4, wider phrasings and more tool dialogs"}
    )
    stage5_from: int = field(
        default=4700,
        metadata={"help": "first step of stage 5: other languages, off-skill questions, large tool results"},
    )
    stage6_from: int = field(
        default=7700,
        metadata={"help": "first step of stage 6: stage 5 in composed phrasings (after the default steps)"},
    )
    tokens_per_step: int = field(default=8192, metadata={"help": "global batch, in tokens"})
    micro_batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per forward pass"})
    max_sample_len: int = field(default=1024, metadata={"help": "longer samples are dropped"})
    lr: float = field(default=2.5e-3, metadata={"help": "peak AdamW learning rate"})
    min_lr_ratio: float = field(default=0.05, metadata={"help": "final learning rate, as a fraction of lr"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up, then cosine decay"})
    weight_decay: float = field(default=0.1, metadata={"help": "on matrices only"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm"})
    vocab_size: int = field(default=1024, metadata={"help": "BPE entries + Qwen3's 26 added tokens"})
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    max_position_embeddings: int = 2048
    tokenizer_samples: int = field(default=4000, metadata={"help": "problems whose texts train the BPE"})

    def model_config(self) -> Qwen3Config:
        return Qwen3Config.from_dict(
            {
                "model_type": "qwen3",
                "architectures": ["Qwen3ForCausalLM"],
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "max_position_embeddings": self.max_position_embeddings,
                "rope_theta": 10000.0,
                "rms_norm_eps": 1e-6,
                "tie_word_embeddings": True,
                "torch_dtype": "float32",
            }
        )

    def learning_rate(self, step: int) -> float:
        return warmup_cosine(step, self.lr, self.warmup_steps, self.steps, self.min_lr_ratio)


def warmup_cosine(step: int, lr: float, warmup_steps: int, steps: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio * lr`` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


GENERATION_CONFIG = {
    "bos_token_id": None,
    "do_sample": True,
    "eos_token_id": None,  # filled in: <|im_end|> and <|endoftext|>, as Qwen3's
    "pad_token_id": None,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
}


@dataclass
class World:
    """This process's place among data-parallel ranks (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(device: str | None = None) -> World:
    """Join the process group when started by ``torchrun`` (gloo on CPU, NCCL on CUDA)."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank, size, dev)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (β 0.9/0.95) with weight decay on matrices only, as every stage trains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=True,
    )


def supervised_loss(model: Qwen3ForCausalLM, batch: data.Batch) -> torch.Tensor:
    """The summed cross-entropy of a micro-batch's learned tokens (the caller normalises)."""
    logits = model(batch.input_ids)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=-100, reduction="sum"
    )


def export_model(model: Qwen3ForCausalLM, tokenizer: Tokenizer, folder: str | os.PathLike) -> Path:
    """The Hugging Face folder: config.json, model.safetensors, tokenizer, generation_config.json."""
    folder = Path(folder)
    save_model(model, folder)
    tokenizer.save_pretrained(folder)
    ids = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    generation = {**GENERATION_CONFIG, "bos_token_id": ids[1], "eos_token_id": ids, "pad_token_id": ids[1]}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(bos_token_id=ids[1], eos_token_id=ids[0])
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


class Trainer:
    """One training run: tokenizer, model, optimizer, the step loop, checkpoints, the exported folder."""

    def __init__(
        self,
        config: TrainConfig,
        output: str | os.PathLike,
        world: World | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.output = Path(output)
        self.world = world or World()
        self.progress = progress and self.world.main
        self.tokenizer = self._tokenizer()
        self.builder = data.SampleBuilder(self.tokenizer)
        self.mix = data.DataMix(max_len=config.max_sample_len)
        torch.manual_seed(config.seed)
        self.model = Qwen3ForCausalLM(config.model_config()).to(self.world.device)
        self.model.init_weights(seed=config.seed)
        self.optimizer = make_optimizer(self.model, config.lr, config.weight_decay)
        self.step = 0
        self.history: list[dict[str, float]] = []
        if self.world.size > 1:  # every rank starts from rank 0's weights
            for p in self.model.parameters():
                dist.broadcast(p.data, src=0)

    # --- setup -----------------------------------------------------------------------------------------

    def _tokenizer(self) -> Tokenizer:
        """Train the BPE (a function of the seed), or reuse the one a checkpoint in ``output`` holds."""
        saved = self.output / "checkpoint" / "tokenizer.json"
        if saved.is_file():
            return Tokenizer.from_pretrained(saved.parent)
        corpus = data.tokenizer_corpus(self.config.seed, self.config.tokenizer_samples)
        tokenizer = data.train_tokenizer(corpus, self.config.vocab_size)
        if tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} ids; vocab_size is {self.config.vocab_size}"
            )
        return tokenizer

    # --- the loop ---------------------------------------------------------------------------------------

    def stage(self, step: int) -> int:
        if step < self.config.stage1_steps:
            return 1
        if step >= self.config.stage6_from:
            return 6
        if step >= self.config.stage5_from:
            return 5
        if step >= self.config.stage4_from:
            return 4
        return 3 if step >= self.config.stage3_from else 2

    def batch(self, step: int) -> tuple[list[data.Batch], int, int]:
        """This rank's micro-batches of step ``step``'s global batch, and the global numbers of target
        tokens and of tokens."""
        samples = data.batch_samples(
            self.builder, self.config.seed, step, self.stage(step), self.config.tokens_per_step, self.mix
        )
        targets = sum(sum(s.targets[1:]) for s in samples)
        mine = samples[self.world.rank :: self.world.size]
        batches = data.micro_batches(mine, self.config.micro_batch_tokens, self.tokenizer.pad_token_id)
        return batches, targets, sum(len(s) for s in samples)

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns the step's mean loss over all ranks' target tokens."""
        config, step = self.config, self.step
        batches, global_targets, global_tokens = self.batch(step)
        lr = config.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total = torch.zeros((), device=self.world.device)
        for batch in batches:
            loss_sum = supervised_loss(self.model, batch.to(self.world.device))
            # Normalised by the global target count, summed over micro-batches and ranks: the gradient of
            # the mean loss over the whole global batch, however it is split.
            (loss_sum / global_targets).backward()
            total += loss_sum.detach()
        if self.world.size > 1:
            self._all_reduce_gradients()
            dist.all_reduce(total)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {
            "step": step,
            "stage": self.stage(step),
            "loss": float(total) / global_targets,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": global_tokens,
        }

    def _all_reduce_gradients(self) -> None:
        """Sum gradients over ranks in one flat buffer (one collective per step, not one per tensor)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def train(self, save_every: int = 200, until: int | None = None) -> list[dict[str, float]]:
        """Run steps up to ``until`` (default: the configured total), checkpointing every ``save_every``."""
        end = min(until or self.config.steps, self.config.steps)
        bar = tqdm(total=end, initial=self.step, desc="train", unit="step", disable=not self.progress)
        start, tokens = time.perf_counter(), 0
        while self.step < end:
            record = self.train_step()
            self.history.append(record)
            tokens += record["tokens"]
            rate = tokens / (time.perf_counter() - start)
            bar.set_postfix(stage=record["stage"], loss=f"{record['loss']:.4f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            if record["step"] % 50 == 0 and not self.progress and self.world.main:
                logger.info("step %d stage %d loss %.4f lr %.2e %.0f tok/s", record["step"],
                            record["stage"], record["loss"], record["lr"], rate)  # fmt: skip
            if save_every and self.step % save_every == 0 and self.step < end:
                self.save_checkpoint()
        bar.close()
        return self.history

    # --- checkpoints -----------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Weights, AdamW moments and the run's state, as safetensors + JSON (rank 0 writes)."""
        folder = self.output / "checkpoint"
        if not self.world.main:
            return folder
        tmp = self.output / "checkpoint.tmp"
        self.export(tmp)
        names = {id(p): n for n, p in self.model.named_parameters()}
        moments, counts = {}, {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if state:
                    moments[f"{names[id(p)]}.exp_avg"] = state["exp_avg"].detach().cpu().contiguous()
                    moments[f"{names[id(p)]}.exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().contiguous()
                    counts[names[id(p)]] = float(state["step"])
        save_file(moments, str(tmp / "optimizer.safetensors"))
        state = {"step": self.step, "config": dataclasses.asdict(self.config), "adam_steps": counts,
                 "history": self.history}  # fmt: skip
        (tmp / "trainer_state.json").write_text(json.dumps(state) + "\n")
        if folder.exists():
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
        tmp.rename(folder)
        logger.info("checkpoint at step %d in %s", self.step, folder)
        return folder

    def resume(self, extend: bool = False) -> bool:
        """Continue from ``output/checkpoint`` if there is one. Its settings must equal this run's, except
        that ``extend`` lets ``steps`` grow: the cosine schedule is then recomputed for the new length
        (a warm restart of the learning rate), and the data continues where it was."""
        folder = self.output / "checkpoint"
        if not (folder / "trainer_state.json").is_file():
            return False
        state = json.loads((folder / "trainer_state.json").read_text())
        ours = dataclasses.asdict(self.config)
        changed = sorted(k for k, v in state["config"].items() if ours.get(k) != v)
        if extend and changed == ["steps"] and self.config.steps > state["config"]["steps"]:
            logger.info("extending the run from %d to %d steps", state["config"]["steps"], self.config.steps)
        elif changed:
            raise ValueError(f"{folder} was written by a run with other settings ({', '.join(changed)})")
        from qwen3.checkpoint import fill_parameters, weight_files

        fill_parameters(self.model, weight_files(folder), progress=False)
        moments = load_file(str(folder / "optimizer.safetensors"), device=str(self.world.device))
        for name, p in self.model.named_parameters():
            if name in state["adam_steps"]:
                self.optimizer.state[p] = {
                    "step": torch.tensor(state["adam_steps"][name]),
                    "exp_avg": moments[f"{name}.exp_avg"],
                    "exp_avg_sq": moments[f"{name}.exp_avg_sq"],
                }
        self.step, self.history = state["step"], state["history"]
        logger.info("resumed from %s at step %d", folder, self.step)
        return True

    def export(self, folder: str | os.PathLike) -> Path:
        """The Hugging Face folder of the model (:func:`export_model`)."""
        return export_model(self.model, self.tokenizer, folder)


def history_plot(history: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """The loss curve as a PNG (log scale; the stage boundaries marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["loss"] for h in history], lw=1)
    labels = {
        2: ("stage 2: Thinking Mode Fusion", "--"),
        3: ("stage 3: general (broader phrasings)", ":"),
        4: ("stage 4: agent (wider phrasings, tools)", "-."),
        5: ("stage 5: polish (languages, declines, large tool results)", (0, (1, 4))),
    }
    for stage, (label, style) in labels.items():
        boundary = next((h["step"] for h in history if h["stage"] == stage), None)
        if boundary is not None:
            ax.axvline(boundary, color="grey", ls=style, lw=1, label=label)
    if any(h["stage"] > 1 for h in history):
        ax.legend()
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title("tiny Qwen3 training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# --- command line (qwen3.train.command parses it) ----------------------------------------------------------


def run(config: TrainConfig, args: Any) -> int:
    """``qwen3 train`` (``--stage sft``): train (resuming when a checkpoint exists), export, plot the loss."""
    world = init_world(args.device)
    trainer = Trainer(config, args.output, world)
    if args.show_data:
        import random

        rng = random.Random(config.seed)
        shown = 0
        while shown < args.show_data:
            for sample in data.stage_samples(trainer.builder, rng, 2, trainer.mix):
                print(data.describe(sample, trainer.tokenizer), end="\n\n")
                shown += 1
        return 0
    if not args.no_resume:
        trainer.resume(extend=args.extend)
    params = sum(p.numel() for p in trainer.model.parameters())
    if world.main:
        logger.info("training a %.2fM-parameter Qwen3 on %s (%d process(es), %d threads)", params / 1e6,
                    world.device, world.size, torch.get_num_threads())  # fmt: skip
    trainer.train(save_every=args.save_every, until=args.until)
    if world.main:
        trainer.save_checkpoint()
        folder = trainer.export(args.output / "model")
        history_plot(trainer.history, args.output / "loss.png")
        logger.info("model written to %s (loss curve: %s)", folder, args.output / "loss.png")
    if world.size > 1:
        dist.destroy_process_group()
    return 0
