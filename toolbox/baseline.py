"""A nanoGPT-style GPT, the yardstick that scripts/bench.py's `baseline` section measures us against.

Pre-LayerNorm blocks with one fused q/k/v projection, a 4x GELU MLP, torch's fused causal attention, no
dropout and no biases, the token embedding tied to the output: the model of nanoGPT's shakespeare_char
recipe, written here so that the comparison runs offline. It is a benchmark reference only; nothing in
the trainer uses it.
"""

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, bias=False)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, bias=False)
        self.fc = nn.Linear(width, 4 * width, bias=False)
        self.fc_proj = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor):
        x = x + self.attn(self.ln_1(x))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, layers: int, heads: int, width: int):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, width)
        self.wpe = nn.Embedding(block_size, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2's depth-scaled residual projections
            for proj in (block.attn.proj, block.fc_proj):
                nn.init.normal_(proj.weight, 0.0, 0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied output projection
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def adamw(model: nn.Module, lr: float, beta2: float = 0.99, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """nanoGPT's optimizer: decay on matrices only, (0.9, beta2)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, beta2),
        foreach=True,
    )


def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_lr: float) -> float:
    """nanoGPT's schedule: linear warmup, cosine to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


# --- nanoGPT's shakespeare_char recipe, scored in bits per byte ------------------------------------


def char_splits(text: str, train_fraction: float = 0.9) -> tuple[torch.Tensor, torch.Tensor, int]:
    """nanoGPT's data/shakespeare_char/prepare.py: one id per distinct character, the first 90% to train on,
    the rest held out. Returns (train ids, val ids, vocabulary size)."""
    alphabet = sorted(set(text))
    lookup = {c: i for i, c in enumerate(alphabet)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    cut = int(len(ids) * train_fraction)
    return ids[:cut], ids[cut:], len(alphabet)


@torch.no_grad()
def bits_per_byte(model: NanoGPT, ids: torch.Tensor, context: int, batch: int = 64) -> float:
    """Mean next-character loss over every non-overlapping window of `context` characters, in bits; one
    character is one byte for ASCII text (the tiny Shakespeare file is ASCII)."""
    model.eval()
    windows = (len(ids) - 1) // context
    inputs = ids[: windows * context].view(windows, context)
    targets = ids[1 : windows * context + 1].view(windows, context)
    nats = sum(
        model(inputs[i : i + batch], targets[i : i + batch]).item() * len(inputs[i : i + batch])
        for i in range(0, windows, batch)
    )
    model.train()
    return nats / windows / math.log(2)


def train_recipe(
    text: str,
    steps: int = 2000,
    batch: int = 12,
    context: int = 64,
    lr: float = 1e-3,
    warmup: int = 100,
    min_lr: float = 1e-4,
    grad_clip: float = 1.0,
    seed: int = 0,
) -> dict:
    """The recipe: 4 layers, 4 heads, width 128, AdamW (0.9, 0.99), warmup then cosine, gradients clipped at
    norm 1 (train.py's grad_clip); random windows as nanoGPT's get_batch draws them. Seconds count everything
    from the text to the held-out score."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    train_ids, val_ids, vocab_size = char_splits(text)
    model = NanoGPT(vocab_size, context, layers=4, heads=4, width=128)
    optimizer = adamw(model, lr)
    loop_start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup, min_lr)
        starts = torch.randint(len(train_ids) - context - 1, (batch,))
        window = torch.stack([train_ids[s : s + context + 1] for s in starts.tolist()])
        model(window[:, :-1], window[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loop_seconds = time.perf_counter() - loop_start
    score = bits_per_byte(model, val_ids, context)
    return {
        "val_bpb": round(score, 3),
        "seconds": round(time.perf_counter() - start, 1),
        "train_tokens_per_s": round(steps * batch * context / loop_seconds),
    }


if __name__ == "__main__":  # python -m train.baseline TEXT STEPS: one recipe run, its figures as JSON
    import json
    import sys
    from pathlib import Path

    print(json.dumps(train_recipe(Path(sys.argv[1]).read_text(), steps=int(sys.argv[2]))))
