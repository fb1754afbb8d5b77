"""A nanoGPT-style training script ported to hardtrain: every recipe of docs/porting.md.

    python examples/porting/gpt_style.py --run-dir runs/porting --steps 200

The original loop draws its batches at random with torch.randint, sets the learning rate
by hand at every iteration, evaluates every --eval-interval iterations, keeps the best
validation loss, clips and accumulates gradients. Here hardtrain runs that loop. Kill it
at any moment and run the same command: it resumes from the newest checkpoint that
verifies and ends with the same weights, evaluations and best loss, bit for bit, as a run
never interrupted. `--eval-only` evaluates the newest checkpoint without training.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import hardtrain as ht

TEXT = Path(__file__).resolve().parent.parent / "data" / "sonnets.txt"


def load_splits() -> tuple[list[str], dict[str, torch.Tensor]]:
    """The characters, and the text as their indices: 90% to train on, 10% to validate."""
    text = TEXT.read_text(encoding="utf-8")
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    return chars, {"train": data[:n], "val": data[n:]}


class TinyGPT(nn.Module):
    """One GPT-2 block over characters (the model is not the point here)."""

    def __init__(self, vocab_size: int, block_size: int, n_embd: int, n_head: int,
                 dropout: float) -> None:
        super().__init__()
        self.block_size, self.n_head, self.dropout = block_size, n_head, dropout
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.ln_1, self.ln_2, self.ln_f = (nn.LayerNorm(n_embd) for _ in range(3))
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying, as in GPT-2
        for module in self.modules():  # GPT-2's init: the first loss is about ln(vocab_size)
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T))
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2)
                   for t in self.qkv(self.ln_1(x)).chunk(3, dim=2))
        y = F.scaled_dot_product_attention(  # dropout: draws from torch's global generator
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, -1))
        logits = self.head(self.ln_f(x + self.mlp(self.ln_2(x))))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, num_chars: int) -> torch.Tensor:
        for _ in range(num_chars):
            logits, _ = self(idx[:, -self.block_size:])
            idx = torch.cat([idx, torch.multinomial(logits[:, -1].softmax(-1), 1)], dim=1)
        return idx


def get_batch(data: torch.Tensor, block_size: int, batch_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """As nanoGPT's: random windows, drawn from torch's global generator."""
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([data[i : i + block_size] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + block_size] for i in ix])
    return x, y


class RandomBatches:
    """The training batches, drawn by get_batch when the trainer takes one.

    Its position needs no saving: every batch comes from torch's global generator, whose
    state is in every checkpoint and is put back last on resume. The empty state_dict()
    tells the trainer so; without it, it would warn that the position cannot be restored.
    """

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int) -> None:
        self.data, self.block_size, self.batch_size = data, block_size, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:  # endless: the draw happens at each next(), not before
            yield get_batch(self.data, self.block_size, self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Progress:
    """What the original kept in globals and in its checkpoint besides the weights."""

    def __init__(self) -> None:
        self.best_val_loss = math.inf
        self.evaluated_at = -1  # the step last evaluated (with accumulation, once per step)

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_loss": self.best_val_loss, "evaluated_at": self.evaluated_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_val_loss = state["best_val_loss"]
        self.evaluated_at = state["evaluated_at"]


def get_lr(it: int, args: argparse.Namespace) -> float:
    """As nanoGPT's: linear warm-up, then cosine decay to min_lr."""
    if it < args.warmup_iters:
        return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
    if it > args.lr_decay_iters:
        return args.min_lr
    decay_ratio = (it - args.warmup_iters) / (args.lr_decay_iters - args.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return args.min_lr + coeff * (args.learning_rate - args.min_lr)


def configure_optimizers(model: nn.Module, weight_decay: float, learning_rate: float
                         ) -> torch.optim.AdamW:
    """As nanoGPT's: weight decay on matrices and embeddings, not on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95))


@torch.no_grad()
def estimate_loss(model: nn.Module, splits: dict[str, torch.Tensor],
                  args: argparse.Namespace) -> dict[str, float]:
    """As nanoGPT's: the mean loss over eval_iters random batches of each split."""
    out = {}
    model.eval()
    for split, data in splits.items():
        losses = torch.zeros(args.eval_iters)
        for k in range(args.eval_iters):
            x, y = get_batch(data, args.block_size, args.batch_size)
            _, loss = model(x, y)
            assert loss is not None
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir",
                        default=os.environ.get("HARDTRAIN_RUN_DIR", "runs/gpt_style"))
    parser.add_argument("--steps", type=int, default=200, help="max_iters")
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--eval-iters", type=int, default=4)
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate the newest checkpoint and exit")
    parser.add_argument("--sample-chars", type=int, default=32,
                        help="characters generated at each evaluation (0: none)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=32)
    parser.add_argument("--n-head", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--min-lr", type=float, default=3e-4)
    parser.add_argument("--warmup-iters", type=int, default=20)
    parser.add_argument("--lr-decay-iters", type=int, default=None, help="default: --steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="0: no clipping")
    parser.add_argument("--save-every", default="30s", help='wall-clock interval, e.g. "30min"')
    parser.add_argument("--save-every-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.steps
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Every generator, not only torch's: Python's and numpy's are in the checkpoint too.
    ht.seed_everything(args.seed)

    chars, splits = load_splits()
    model = TinyGPT(len(chars), args.block_size, args.n_embd, args.n_head, args.dropout)
    # lr=1.0: LambdaLR sets lr = 1.0 * get_lr(it), exactly the value the original set.
    optimizer = configure_optimizers(model, args.weight_decay, learning_rate=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: get_lr(it, args))
    progress = Progress()
    trainer = ht.HardenedTrainer(
        model, optimizer, RandomBatches(splits["train"], args.block_size, args.batch_size),
        args.run_dir, scheduler=scheduler, extra_state={"progress": progress},
        config={k: v for k, v in vars(args).items() if k not in ("run_dir", "eval_only")},
        checkpoint=ht.CheckpointPolicy(every=args.save_every, every_steps=args.save_every_steps),
    )

    def evaluate(step: int) -> dict[str, float]:
        losses = estimate_loss(model, splits, args)
        line = f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        if args.sample_chars > 0:
            model.eval()
            out = model.generate(torch.tensor([[chars.index("\n")]]), args.sample_chars)
            model.train()
            line += " | " + "".join(chars[i] for i in out[0, 1:].tolist()).replace("\n", "/")
        print(line, flush=True)
        return losses

    if args.eval_only:
        info = trainer.restore()  # the newest verified checkpoint; writes nothing
        evaluate(info.step)
        return

    def step_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # trainer.step: completed optimizer steps, the original's iter_num. With
        # accumulation step_fn runs grad_accum times per step: evaluate once.
        if trainer.step % args.eval_interval == 0 and progress.evaluated_at != trainer.step:
            progress.evaluated_at = trainer.step
            losses = evaluate(trainer.step)
            progress.best_val_loss = min(progress.best_val_loss, losses["val"])
        x, y = batch
        _, loss = model(x, y)
        assert loss is not None
        return loss  # hardtrain divides it by grad_accum before backward

    result = trainer.fit(step_fn, args.steps, grad_accum_steps=args.grad_accum,
                         max_grad_norm=args.grad_clip or None)
    if trainer.step % args.eval_interval == 0:  # the original also evaluates at max_iters;
        evaluate(trainer.step)                  # fit stops before step_fn would see it
    loss = "n/a (already finished)" if result.final_loss is None else f"{result.final_loss:.4f}"
    print(f"gpt_style: step {result.step}/{args.steps}, resumed_from={result.resumed_from}, "
          f"{result.num_steps} steps in {result.elapsed_s:.1f}s, final loss {loss}, "
          f"best val loss {progress.best_val_loss:.4f}")


if __name__ == "__main__":
    main()
