"""Train a micro BitNet b1.58 classifier and write it as an I2_S GGUF that edgebit runs as is.

One readable recipe, top to bottom (nanoGPT's train.py is the model): config, data (a byte-level
BPE vocabulary trained with `tokenizers`, then "template(text) label" sequences), the model (the
BitNet recipe: latent float weights quantised in the forward pass to absmean ternary with a
per-tensor scale, activations to per-token absmax int8, straight-through gradients), the loop,
held-out evaluation and the GGUF export.

The model's forward pass is the same math as `edgebit.transformer` (spec §4): pre-norm blocks,
sub-norms before attn_output and ffn_down, NEOX RoPE, GQA, relu² FFN, tied head. After export
the f16 embedding is the only rounding, so edgebit's logits match the torch model's closely
(tests/test_train.py checks it). Training needs torch (`pip install edgebit[train]`); inference
never imports this module.

The bundled model is reproduced with `edgebit train --sensors -o edgebit/models/edgebit-sensors.gguf`
(fixed seed); `edgebit train DATA.jsonl --labels a,b -o my.gguf` trains on your own
`{"text": ..., "label": ...}` lines.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import quants
from .classify import LABELS_KEY, TEMPLATE_KEY
from .gguf_writer import GGUFWriter
from .tokenizer import CONTROL, LLAMA3_PATTERN, UNUSED, Tokenizer
from .transformer import Config

# --- config


@dataclass
class TrainConfig:
    """Shape of the model and the optimisation; the defaults make the bundled `edgebit-sensors`."""

    n_vocab: int = 2048
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 384
    n_ctx: int = 160
    rope_base: float = 10000.0
    eps: float = 1e-5
    steps: int = 6000
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2  # results are bit-reproducible for a given thread count (deterministic algorithms)
    eval_every: int = 250
    noise: float = 0.5  # share of training sequences that get 1-3 random tokens inserted in the message


BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

# --- data: vocabulary and sequences


def _digit_groups() -> list[str]:
    """Every group of one to three digits the LLaMA-3 split can cut a number into (no leading zeros
    beyond two-digit groups): seeded into the vocabulary corpus so each group is one token, and the
    model reads a value as a few whole-number tokens rather than arbitrary BPE fragments."""
    return [str(i) for i in range(1000)] + [f"0{i}" for i in range(10)]


def train_vocabulary(texts: Sequence[str], n_vocab: int) -> dict[str, object]:
    """A byte-level BPE vocabulary of exactly `n_vocab` entries trained on `texts` with `tokenizers`,
    as GGUF `tokenizer.ggml.*` metadata (LLaMA-3 split; BOS and EOS at the end, CONTROL). Every
    1-3 digit group becomes a token when the vocabulary has room (`_digit_groups`)."""
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"), byte_level])
    trainer = trainers.BpeTrainer(vocab_size=n_vocab - 2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    groups = " ".join(_digit_groups()) if n_vocab >= 1536 else ""
    hf.train_from_iterator([*texts, *[groups] * 1000], trainer)
    model = json.loads(hf.to_str())["model"]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in by_id]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [1] * len(tokens)
    while len(tokens) < n_vocab - 2:  # a small corpus may not fill the vocabulary: unreachable fillers
        tokens.append(f"<unused_{len(tokens)}>")
        types.append(UNUSED)
    tokens += [BOS, EOS]
    types += [CONTROL, CONTROL]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array(types, dtype=np.int32), "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": len(tokens) - 2, "tokenizer.ggml.eos_token_id": len(tokens) - 1,
            "tokenizer.ggml.add_bos_token": True}


def label_sequence(tok: Tokenizer, template: str, text: str, label: str) -> tuple[list[int], int]:
    """(ids of BOS + template(text) + " " + label, index of the first label token), exactly the tokens
    `Model.classify` scores (classify.py: the whole string encoded at once)."""
    prompt = template.replace("{text}", text)
    sep = "" if prompt[-1:].isspace() else " "
    ids = tok.encode(prompt + sep + label, bos=True)
    head = tok.encode(prompt, bos=True)
    start = next((i for i, (a, b) in enumerate(zip(ids, head, strict=False)) if a != b), len(head))
    return ids, min(start, len(ids) - 1)


@dataclass
class Dataset:
    """Token sequences with where their label starts; `label_ids` index into the labels."""

    ids: list[list[int]]
    starts: list[int]
    label_ids: list[int]
    texts: list[str]


def encode_dataset(tok: Tokenizer, template: str, rows: Sequence[tuple[str, str]], labels: Sequence[str],
                   n_ctx: int) -> Dataset:
    data = Dataset([], [], [], [])
    for text, label in rows:
        ids, start = label_sequence(tok, template, text, label)
        if len(ids) > n_ctx:
            continue  # too long for the context: classify would refuse it too
        data.ids.append(ids)
        data.starts.append(start)
        data.label_ids.append(labels.index(label))
        data.texts.append(text)
    return data


# --- model: the BitNet recipe


def ternary(w: torch.Tensor) -> torch.Tensor:
    """Absmean ternary weights with a per-tensor scale (as convert.absmean_ternary), straight-through."""
    inv = 1.0 / w.abs().mean().clamp(min=1e-5)
    q = (w * inv).round().clamp(-1, 1) / inv
    return w + (q - w).detach()


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax int8 activations (spec §4.2), straight-through."""
    gamma = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    q = (x * gamma).round().clamp(-128, 127) / gamma
    return x + (q - x).detach()


class BitLinear(nn.Linear):
    """y = Q8(x) · ternary(W)ᵀ; no bias."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(int8_activations(x), ternary(self.weight))


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    def __init__(self, c: TrainConfig) -> None:
        super().__init__()
        self.c = c
        hd = c.n_embd // c.n_head
        self.attn_norm, self.attn_sub_norm = RMSNorm(c.n_embd, c.eps), RMSNorm(c.n_embd, c.eps)
        self.ffn_norm, self.ffn_sub_norm = RMSNorm(c.n_embd, c.eps), RMSNorm(c.n_ff, c.eps)
        self.attn_q, self.attn_k = BitLinear(c.n_embd, c.n_embd), BitLinear(c.n_embd, c.n_head_kv * hd)
        self.attn_v, self.attn_output = BitLinear(c.n_embd, c.n_head_kv * hd), BitLinear(c.n_embd, c.n_embd)
        self.ffn_gate, self.ffn_up = BitLinear(c.n_embd, c.n_ff), BitLinear(c.n_embd, c.n_ff)
        self.ffn_down = BitLinear(c.n_ff, c.n_embd)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c, (B, T, _) = self.c, h.shape
        hd = c.n_embd // c.n_head
        a = self.attn_norm(h)
        q = self.attn_q(a).view(B, T, c.n_head, hd).transpose(1, 2)
        k = self.attn_k(a).view(B, T, c.n_head_kv, hd).transpose(1, 2)
        v = self.attn_v(a).view(B, T, c.n_head_kv, hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        n_rep = c.n_head // c.n_head_kv  # query head h reads kv head h // n_rep
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, c.n_embd)
        h = h + self.attn_output(self.attn_sub_norm(o))
        f = self.ffn_norm(h)
        z = F.relu(self.ffn_gate(f)).square() * self.ffn_up(f)
        return h + self.ffn_down(self.ffn_sub_norm(z))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NEOX rotate-half: pairs (i, i + d/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class MicroBitNet(nn.Module):
    """The `bitnet-b1.58` architecture in torch, trained quantisation-aware."""

    def __init__(self, c: TrainConfig) -> None:
        super().__init__()
        self.c = c
        self.token_embd = nn.Parameter(torch.randn(c.n_vocab, c.n_embd) * 0.02)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.output_norm = RMSNorm(c.n_embd, c.eps)
        hd = c.n_embd // c.n_head
        inv_freq = 1.0 / (c.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        angles = torch.arange(c.n_ctx, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (B, T, n_embd)."""
        T = ids.shape[1]
        h = self.token_embd[ids]
        for block in self.blocks:
            h = block(h, self.cos[:T], self.sin[:T])
        return self.output_norm(h)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, n_vocab) through the tied head."""
        return self.hidden(ids) @ self.token_embd.T


def number_features(text: str, dims: int) -> np.ndarray | None:
    """A starting embedding for a digit-group token ("7", "28", "145", "05"): `dims` soft thermometer
    codes, half of its value as an integer (thresholds spaced geometrically from 0.5 to 1000), half
    of its value as decimals after a point (0.05 for "05"). None for other tokens.

    Sensor labels hinge on comparing numbers with thresholds; a tiny model trained from random number
    embeddings must learn each of ~1000 tokens' magnitudes from examples. Starting from codes in which
    "value above t" is (nearly) linear, it only has to learn where the thresholds are."""
    if not (1 <= len(text) <= 3 and text.isascii() and text.isdigit()):
        return None
    value, half = int(text), dims // 2
    fraction = value / 10 ** len(text)
    steps = np.geomspace(0.5, 1000.0, half)
    integer_code = np.tanh((value - steps) / (0.15 * steps))
    cuts = np.linspace(0.0, 1.0, dims - half + 2)[1:-1]
    fraction_code = np.tanh((fraction - cuts) / 0.04)
    return np.concatenate([integer_code, fraction_code]).astype(np.float32)


def init_number_embeddings(model: MicroBitNet, tok: Tokenizer, dims: int = 64, scale: float = 0.05) -> int:
    """Put `number_features` into the first `dims` embedding columns of every digit-group token;
    returns how many tokens got them (the rest of each row stays random, and all of it is trained)."""
    count = 0
    with torch.no_grad():
        for i in range(tok.vocab_size):
            if tok.is_special(i):
                continue
            feats = number_features(tok.token_bytes(i).decode("latin-1"), dims)
            if feats is not None:
                model.token_embd[i, :dims] = torch.from_numpy(feats) * scale
                count += 1
    return count


# --- loop


def _batch(data: Dataset, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids right-padded with 0, positions predicting a label token, their targets)."""
    T = max(len(data.ids[r]) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    where, targets = [], []
    for b, r in enumerate(rows):
        seq = data.ids[r]
        ids[b, : len(seq)] = torch.tensor(seq)
        for t in range(data.starts[r], len(seq)):
            where.append(b * T + t - 1)
            targets.append(seq[t])
    return ids, torch.tensor(where), torch.tensor(targets)


def with_noise(data: Dataset, rows: Sequence[int], fillers: Sequence[int], share: float, rng: random.Random,
               n_ctx: int, margin: int = 4) -> Dataset:
    """The rows, a `share` of them with 1-3 random `fillers` tokens inserted at random places in the
    message (after BOS, at least `margin` tokens before the label: the template's tail stays whole;
    never past `n_ctx` tokens).

    Messages in the field carry words the training set never had (new phrasings, units, device
    names); a token the model never saw is noise at full scale after the first RMSNorm. Trained
    with random tokens dropped in, the model learns to read past them, and every vocabulary entry
    gets trained."""
    out = Dataset([], [], [], [])
    for r in rows:
        ids, start = list(data.ids[r]), data.starts[r]
        if fillers and rng.random() < share and start - margin > 1 and len(ids) + 3 <= n_ctx:
            for _ in range(rng.randint(1, 3)):
                ids.insert(rng.randint(1, start - margin), rng.choice(fillers))
                start += 1
        out.ids.append(ids)
        out.starts.append(start)
        out.label_ids.append(data.label_ids[r])
    return out


def filler_tokens(tok: Tokenizer) -> list[int]:
    """Vocabulary entries fit to be dropped into a message as noise: not special, no digits."""
    return [i for i in range(tok.vocab_size)
            if not tok.is_special(i) and not any(chr(b).isdigit() for b in tok.token_bytes(i))]


def label_loss(model: MicroBitNet, data: Dataset, rows: Sequence[int]) -> torch.Tensor:
    """Cross-entropy of the label tokens only: the rows `Model.classify` reads."""
    ids, where, targets = _batch(data, rows)
    h = model.hidden(ids).reshape(-1, model.c.n_embd)[where]
    return F.cross_entropy(h @ model.token_embd.T, targets)


@torch.no_grad()
def predict(model: MicroBitNet, tok: Tokenizer, template: str, texts: Sequence[str], labels: Sequence[str],
            batch: int = 128) -> list[int]:
    """Best label index per text by summed label-token log-probability (as `Model.classify` ranks)."""
    model.eval()
    scores = np.zeros((len(texts), len(labels)))
    for j, label in enumerate(labels):
        seqs = [label_sequence(tok, template, t, label) for t in texts]
        for s in range(0, len(seqs), batch):
            chunk = seqs[s : s + batch]
            data = Dataset([c[0] for c in chunk], [c[1] for c in chunk], [0] * len(chunk), [])
            ids, where, targets = _batch(data, range(len(chunk)))
            logp = F.log_softmax(model.hidden(ids).reshape(-1, model.c.n_embd)[where] @ model.token_embd.T, -1)
            picked = logp[torch.arange(len(targets)), targets].numpy()
            owner = (where // ids.shape[1]).numpy()
            np.add.at(scores[:, j], s + owner, picked)
    model.train()
    return list(scores.argmax(axis=1))


def train(c: TrainConfig, rows: Sequence[tuple[str, str]], held_out: Sequence[tuple[str, str]],
          labels: Sequence[str], template: str, vocab_texts: Sequence[str] | None = None,
          progress: Callable[[int, int, float], None] | None = None,
          log: Callable[[str], None] = print) -> tuple[MicroBitNet, dict[str, object], dict[str, float]]:
    """Train on `rows` (text, label); returns (model, tokenizer metadata, held-out report)."""
    random.seed(c.seed)
    torch.manual_seed(c.seed)
    torch.set_num_threads(c.threads)
    torch.use_deterministic_algorithms(True)  # else the embedding's backward sums in a varying order
    # the vocabulary is trained on exactly the strings the model will read: prompt, text and label
    texts = vocab_texts or [template.replace("{text}", t) + " " + lab for t, lab in rows]
    meta = train_vocabulary(texts, c.n_vocab)
    tok = Tokenizer.from_metadata(meta, source="<trained vocabulary>")
    data = encode_dataset(tok, template, rows, labels, c.n_ctx)
    if not data.ids:
        raise ValueError("no training example fits in the context")
    log(f"{len(data.ids)} training sequences (of {len(rows)}), {len(held_out)} held out, vocabulary {c.n_vocab}")
    model = MicroBitNet(c)
    init_number_embeddings(model, tok, dims=min(64, c.n_embd // 2))
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and n != "token_embd"]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and n != "token_embd")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=c.lr, betas=(0.9, 0.95))
    order = sorted(range(len(data.ids)), key=lambda r: len(data.ids[r]))  # length buckets: little padding
    batches = [order[i : i + c.batch] for i in range(0, len(order), c.batch)]
    rng = random.Random(c.seed)
    fillers = filler_tokens(tok) if c.noise > 0 else []
    start = time.monotonic()
    for step in range(c.steps):
        lr = c.lr * min(1.0, (step + 1) / c.warmup) * 0.5 * (1 + math.cos(math.pi * step / c.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = with_noise(data, rng.choice(batches), fillers, c.noise, rng, c.n_ctx)
        loss = label_loss(model, batch, range(len(batch.ids)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress(step + 1, c.steps, loss.item())
        if held_out and c.eval_every and (step + 1) % c.eval_every == 0 and step + 1 < c.steps:
            acc = accuracy(model, tok, template, held_out[:500], labels)
            log(f"step {step + 1}: loss {loss.item():.4f}, held-out accuracy (500) {acc:.4f}")
    report = {"seconds": time.monotonic() - start, "train_sequences": len(data.ids)}
    if held_out:
        report["accuracy"] = accuracy(model, tok, template, held_out, labels)
    return model, meta, report


def accuracy(model: MicroBitNet, tok: Tokenizer, template: str, rows: Sequence[tuple[str, str]],
             labels: Sequence[str]) -> float:
    best = predict(model, tok, template, [t for t, _ in rows], labels)
    return float(np.mean([labels[b] == lab for b, (_, lab) in zip(best, rows, strict=True)]))


# --- export


def export(model: MicroBitNet, meta: dict[str, object], path: str | os.PathLike[str], labels: Sequence[str],
           template: str, name: str = "edgebit-micro") -> str:
    """Write the model as a `bitnet-b1.58` GGUF: I2_S projections (absmean codes + scale), f16 tied
    embedding, f32 norms, the trained vocabulary, and the classification template and labels."""
    c = model.c
    config = Config(arch="bitnet-b1.58", n_vocab=c.n_vocab, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                    n_head_kv=c.n_head_kv, head_dim=c.n_embd // c.n_head, n_ff=c.n_ff, n_ctx=c.n_ctx,
                    rope_base=c.rope_base, eps=c.eps, activation="relu2")
    path = os.fspath(path)
    w = GGUFWriter(path)
    w.add("general.architecture", config.arch)
    w.add("general.name", name)
    w.add("edgebit.train.config", json.dumps(asdict(c), sort_keys=True))
    for key, value in config.metadata():
        w.add(key, value)
    for key, value in meta.items():
        w.add(key, value, elem_type=8 if key == "tokenizer.ggml.merges" else None)
    w.add(TEMPLATE_KEY, template)
    w.add(LABELS_KEY, list(labels), elem_type=8)

    def f32(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float32)

    w.add_array("token_embd.weight", f32(model.token_embd).astype(np.float16))
    w.add_array("output_norm.weight", f32(model.output_norm.weight))
    for i, block in enumerate(model.blocks):
        for norm in ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm"):
            w.add_array(f"blk.{i}.{norm}.weight", f32(getattr(block, norm).weight))
        for proj in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            weight = f32(getattr(block, proj).weight)
            inv = np.float32(1.0) / np.float32(max(float(np.abs(weight).mean(dtype=np.float32)), 1e-5))
            codes = np.clip(np.rint(weight * inv), -1, 1).astype(np.int8)
            w.add_tensor(f"blk.{i}.{proj}.weight", weight.shape, "I2_S",
                         quants.i2s_encode(codes, float(np.float32(1.0) / inv)))
    w.write()
    return path


# --- the bundled model


def sensors_rows(n: int, split: str, seed: int) -> list[tuple[str, str]]:
    """`n` generated (text, label) rows of the sensor task (edgebit/sensors_data.py)."""
    from .sensors_data import generate

    return [(e.text, e.label) for e in generate(n, split, seed)]


def sensors_data(n_train: int, n_eval: int, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Training rows and the held-out rows (disjoint names, phrasings and value draws; any text that
    happens to occur in the training rows too is dropped from the held-out set)."""
    rows = sensors_rows(n_train, "train", seed)
    seen = {t for t, _ in rows}
    return rows, [r for r in sensors_rows(n_eval, "eval", seed) if r[0] not in seen]
