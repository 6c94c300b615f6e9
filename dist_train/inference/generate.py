"""`predict` for a language model: a greedy continuation of a prompt, in the run's own vocabulary.

The vocabulary is what the data set named its token ids by (its `classes`, or a `vocab`
attribute), recorded in every manifest as `class_names`; token id i is `class_names[i]`. A
vocabulary of single characters encodes a prompt character by character, any other one
word by word (whitespace-separated). The model sees at most its `block_size` (a model
argument) last tokens, as in training; without one, the whole sequence so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dist_train.errors import UserError, printable
from dist_train.inference.loading import LoadedModel


@dataclass
class Continuation:
    source: str
    prompt: str
    text: str  # the generated tokens only, decoded

    def as_dict(self) -> dict[str, Any]:
        return {"input": self.source, "prompt": self.prompt, "continuation": self.text}


def vocabulary(loaded: LoadedModel) -> list[str] | None:
    """Token strings by id, as recorded in the checkpoint; None when the data set named none."""
    names = loaded.manifest.get("class_names")
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names) \
            and loaded.spec.num_classes in (None, len(names)):
        return names
    return None


def _char_level(vocab: Sequence[str]) -> bool:
    return all(len(token) == 1 for token in vocab)


def encode(vocab: Sequence[str], text: str, url: str) -> list[int]:
    lookup = {token: i for i, token in enumerate(vocab)}
    pieces = list(text) if _char_level(vocab) else text.split()
    unknown = sorted({p for p in pieces if p not in lookup})
    if unknown:
        shown = ", ".join(repr(p) for p in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UserError(f"the prompt has tokens outside the vocabulary of checkpoint {url}: {printable(shown)}")
    if not pieces:
        raise UserError("the prompt is empty: a language model continues at least one token")
    return [lookup[p] for p in pieces]


def decode(vocab: Sequence[str] | None, ids: Sequence[int]) -> str:
    if vocab is None:
        return " ".join(str(i) for i in ids)
    return ("" if _char_level(vocab) else " ").join(vocab[i] if 0 <= i < len(vocab) else f"<{i}>" for i in ids)


def context_length(loaded: LoadedModel) -> int | None:
    value = loaded.spec.args.get("block_size")
    return int(value) if isinstance(value, int) and value > 0 else None


@torch.no_grad()
def greedy(loaded: LoadedModel, ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """The `max_new_tokens` most probable next tokens, one at a time (outputs `[1, T, V]`)."""
    window = context_length(loaded)
    sequence = list(ids)
    for _ in range(max_new_tokens):
        context = sequence[-window:] if window else sequence
        logits = loaded.model(torch.tensor([context], dtype=torch.long, device=loaded.device))
        if logits.dim() != 3:
            raise UserError(f"model {loaded.spec.name} returned outputs of shape {list(logits.shape)}; "
                            "a language model returns [batch, tokens, vocabulary]")
        sequence.append(int(logits[0, -1].argmax()))
    return sequence[len(ids):]


def continue_prompts(loaded: LoadedModel, prompts: Sequence[tuple[str, str]],
                     max_new_tokens: int) -> list[Continuation]:
    """(source, text) prompts continued greedily; needs the recorded vocabulary."""
    vocab = vocabulary(loaded)
    if vocab is None:
        raise UserError(f"checkpoint {loaded.url} records no vocabulary (the data set's `classes` or `vocab`): "
                        "a text prompt cannot be encoded; predict without inputs shows validation samples")
    return [Continuation(source, text, decode(vocab, greedy(loaded, encode(vocab, text, loaded.url), max_new_tokens)))
            for source, text in prompts]


def continue_ids(loaded: LoadedModel, sources: Sequence[str], sequences: Sequence[torch.Tensor],
                 max_new_tokens: int) -> list[Continuation]:
    """Token-id sequences (validation samples, tensor files) continued; decoded when a vocabulary is known."""
    vocab = vocabulary(loaded)
    out = []
    for source, ids in zip(sources, sequences):
        prompt = [int(i) for i in ids.reshape(-1).tolist()]
        out.append(Continuation(source, decode(vocab, prompt), decode(vocab, greedy(loaded, prompt, max_new_tokens))))
    return out


def format_continuations(items: Sequence[Continuation]) -> list[str]:
    return [f"{c.source}: {c.prompt!r}  ->  {c.text!r}" for c in items]
