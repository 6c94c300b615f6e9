"""A character-level causal transformer (nanoGPT, shrunk to CPU size) trained through dist_train's Python API.

The text is CPython's own `pydoc_data.topics` (~465 KB of English help text that ships
with every Python install): its values concatenated in sorted key order, the first 90%
for training, the rest for validation. Each sample is (input_ids[T], target_ids[T]),
the targets shifted by one character; the model returns logits [B, T, vocab] and the
built-in `language_model` task scores next-character cross-entropy and perplexity.

Run from the repository root (`-m` so the checkpoints name an importable model, which
`dist-train evaluate` and `export` rebuild):

    # one process
    python -m examples.char_transformer --run-dir runs/char --epochs 1

    # two processes (DDP on CPU with gloo; nccl on GPUs), bit-exact resume after a kill
    torchrun --standalone --nproc-per-node 2 -m examples.char_transformer --run-dir runs/char \\
        --epochs 2 --checkpoint-every 20 --deterministic

    # a greedy continuation from the newest valid checkpoint of a run dir (or a checkpoint URL);
    # after one epoch it mostly repeats common characters: train for more epochs to see words
    python -m examples.char_transformer --generate runs/char --prompt "The return statement" --length 200

    # the validation loss and perplexity of the newest checkpoint, by the CLI
    dist-train evaluate --checkpoint runs/char

Every `dist-train train` flag works (`--run-dir s3://bucket/prefix`, `--max-steps`,
`--lr`, `--keep-last`, ...). The sizes come from `--model-args` (`block_size`,
`n_layer`, `n_head`, `d_model`, `dropout`) and `--dataset-args` (`block_size`,
`train_sequences`, `val_sequences`); give the same `block_size` to both. The vocabulary
is every character of the text (about 100): a uniform guess has perplexity equal to
its size; one epoch on a CPU (seconds) brings validation perplexity to about a tenth of it.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

# The example's own defaults; flags given on the command line come later and win.
DEFAULT_FLAGS = ["--lr", "3e-3", "--optimizer", "adamw", "--epochs", "1", "--batch-size", "32", "--log-every", "20"]
VAL_FRACTION = 0.1


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, list[str]]:
    """The text and its sorted character vocabulary (the same on every rank and every run)."""
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics))
    return text, sorted(set(text))


class CharText(Dataset):
    """Evenly spaced windows of one split of the text, at most `sequences` of them (a short epoch)."""

    def __init__(self, split: str, block_size: int = 64, sequences: int = 4000):
        text, vocab = corpus()
        lookup = {ch: i for i, ch in enumerate(vocab)}
        cut = int(len(text) * (1 - VAL_FRACTION))
        part = text[:cut] if split == "train" else text[cut:]
        self.ids = torch.tensor([lookup[ch] for ch in part], dtype=torch.long)
        self.block_size = block_size
        windows = len(self.ids) - block_size  # a window needs block_size + 1 characters
        count = max(1, min(sequences, windows))
        self.stride = max(1, windows // count)
        self.count = count
        self.vocab = vocab
        self.num_classes = len(vocab)  # handed to the model factory as `num_classes` (the vocabulary size)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.stride
        chunk = self.ids[start:start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def char_text(split: str, block_size: int = 64, train_sequences: int = 4000,
              val_sequences: int = 500) -> CharText | None:
    """The data set factory dist_train calls per split (no test split)."""
    if split not in ("train", "val"):
        return None
    return CharText(split, block_size, train_sequences if split == "train" else val_sequences)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP, each with a residual."""

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
                                 nn.Dropout(dropout))
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.resid_drop(self.proj(y.transpose(1, 2).reshape(batch, length, width)))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, d_model: int, dropout: float):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not a multiple of n_head {n_head}")
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # weight tying, as in GPT-2 / nanoGPT
        self.apply(self._init)
        for name, param in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.block_size:
            raise ValueError(f"sequence of {length} tokens is longer than the model's block_size {self.block_size}")
        x = self.drop(self.tok(ids) + self.pos(torch.arange(length, device=ids.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build(num_classes: int, block_size: int = 64, n_layer: int = 2, n_head: int = 4, d_model: int = 64,
          dropout: float = 0.0) -> CharTransformer:
    """The model factory: dist_train passes the vocabulary size as `num_classes` (the data set reports it)."""
    return CharTransformer(num_classes, block_size, n_layer, n_head, d_model, dropout)


@torch.no_grad()
def generate(source: str, prompt: str, length: int) -> str:
    """Greedy continuation of `prompt` by the model of the newest valid checkpoint of `source`."""
    from dist_train import CheckpointManager

    probe = CheckpointManager(source)
    payload = probe.find(source)
    if payload is None:
        raise SystemExit(f"no valid checkpoint in {source}")
    spec = payload.manifest.get("model", {})
    _, vocab = corpus()
    model = build(**{**spec.get("args", {}), **spec.get("shape", {})})
    model.load_state_dict(payload.entries["model"])
    model.eval()
    lookup = {ch: i for i, ch in enumerate(vocab)}
    ids = [lookup[ch] for ch in prompt if ch in lookup] or [lookup[" "]]
    for _ in range(length):
        logits = model(torch.tensor([ids[-model.block_size:]]))
        ids.append(int(logits[0, -1].argmax()))
    return "".join(vocab[i] for i in ids)


def cli(argv: list[str]) -> None:
    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("--generate", metavar="RUN_DIR_OR_CHECKPOINT")
    ours.add_argument("--prompt", default="The ")
    ours.add_argument("--length", type=int, default=200)
    args, rest = ours.parse_known_args(argv)
    if args.generate:
        print(generate(args.generate, args.prompt, args.length))
        return
    import dist_train

    dist_train.main(model=build, dataset=char_text, task="language_model", argv=[*DEFAULT_FLAGS, *rest])


if __name__ == "__main__":
    cli(sys.argv[1:])
