"""A small character-level GPT (nanoGPT-style), trained on Shakespeare's sonnets on CPU.

    python examples/train_gpt.py --run-dir runs/gpt --steps 600

Kill it at any moment (Ctrl-C, `kill -9`, a preempted machine) and run the same command:
it resumes from the newest checkpoint that verifies, and ends with the same weights, bit
for bit, as a run that was never interrupted. The default config trains in well under a
minute on two CPU cores; raise --n-layer, --n-embd, --block-size for a better model.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import hardtrain as ht

TEXT = Path(__file__).with_name("data") / "sonnets.txt"


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.1


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.n_layer)))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying, as in GPT-2
        self.apply(_init_weights)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits for the next character at every position of ``idx`` (batch, time)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        return self.lm_head(self.ln_f(self.blocks(x)))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, num_chars: int, generator: torch.Generator
                 ) -> torch.Tensor:
        for _ in range(num_chars):
            logits = self(idx[:, -self.cfg.block_size:])[:, -1, :]
            next_char = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, next_char], dim=1)
        return idx


def _init_weights(module: nn.Module) -> None:
    """GPT-2's init: small weights, so that the first loss is about ln(vocab_size)."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class CharDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Every window of ``block_size`` characters, with the same window one to the right as
    the targets. Map-style, so a shuffled DataLoader over it resumes at the exact batch."""

    def __init__(self, text: str, block_size: int) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.data = torch.tensor([self.index[c] for c in text], dtype=torch.long)
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.data) - self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.data[i : i + self.block_size + 1]
        return window[:-1], window[1:]

    def decode(self, idx: torch.Tensor) -> str:
        return "".join(self.chars[i] for i in idx.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir",
                        default=os.environ.get("HARDTRAIN_RUN_DIR", "runs/train_gpt"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    # Short, so that a demo kill loses seconds; on a real job use minutes ("30min").
    parser.add_argument("--save-every", default="5s", help='wall-clock interval, e.g. "30min"')
    parser.add_argument("--save-every-steps", type=int, default=None)
    parser.add_argument("--sample-chars", type=int, default=200,
                        help="characters to generate at the end (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # Before anything random: a fresh start must be reproducible. A resume then replaces
    # the weights and every RNG stream with the checkpoint's.
    ht.seed_everything(args.seed)
    dataset = CharDataset(TEXT.read_text(encoding="utf-8"), args.block_size)
    model = GPT(GPTConfig(len(dataset.chars), args.block_size, args.n_layer, args.n_head,
                          args.n_embd, args.dropout))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers)

    # As in nanoGPT: weight decay on matrices (embeddings included), not on biases or norms.
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    trainer = ht.HardenedTrainer(
        model, optimizer, loader, args.run_dir, scheduler=scheduler, config=vars(args),
        checkpoint=ht.CheckpointPolicy(every=args.save_every, every_steps=args.save_every_steps),
    )

    def step_fn(batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))

    result = trainer.fit(step_fn, args.steps, max_grad_norm=1.0)

    loss = "n/a (already finished)" if result.final_loss is None else f"{result.final_loss:.4f}"
    print(f"train_gpt: step {result.step}/{args.steps}, resumed_from={result.resumed_from}, "
          f"{result.num_steps} steps in {result.elapsed_s:.1f}s, final loss {loss}")
    if args.sample_chars > 0:
        model.eval()
        start = torch.tensor([[dataset.index["\n"]]])
        out = model.generate(start, args.sample_chars, torch.Generator().manual_seed(args.seed))
        print(dataset.decode(out[0, 1:]))


if __name__ == "__main__":
    main()
