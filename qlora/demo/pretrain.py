"""Pretrain the demo's base model: a small Llama that knows the demo language but not the demo task.

    python -m qlora.demo.pretrain --out qlora/demo/assets/base-model      (also: make assets)

Corpus -> tokenizer -> randomly initialised `LlamaForCausalLM` -> plain fp32 causal-LM training on CPU with
a fixed seed -> `save_pretrained` in float16 (9.5 MB: small enough to commit). The model (4.75M parameters)
is sized so a 4-bit QLoRA step of the demo takes a fraction of a second on two CPU cores, yet large enough
to memorise the lexicon (every plural, category, opposite and past tense). Every quarter of the run it
checks that knowledge in the corpus's own phrasing ("the mouse was alone. now there are two ..."), which is
the knowledge the demo fine-tune has to reach: the committed model completes 97 % of the plurals.

The default 1400 steps take about 15 minutes on two idle CPU cores (32 minutes on a shared, busy
machine). Everything is seeded, so the same torch version on the same kind of CPU rebuilds the committed
`model.safetensors` bit for bit; elsewhere float summation order may differ slightly, and the probe and
the demo's figures are what to compare.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from qlora.demo import corpus
from qlora.demo.datasets import INSTRUCTIONS
from qlora.demo.tokenizer import train_tokenizer

VOCAB_SIZE = 4096


def model_config(tokenizer, max_positions: int = 256) -> LlamaConfig:
    """The base model's shape: ~4M parameters, hidden/intermediate sizes multiples of 64."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def token_blocks(tokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    """All documents as `<s> doc </s>` back to back, cut into (n, seq_len) blocks."""
    stream = []
    for ids in tokenizer(docs)["input_ids"]:  # the post-processor already puts <s> first
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(model, tokenizer, blocks: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> None:
    """Plain AdamW causal-LM training over shuffled blocks, printing progress and, every quarter of the
    run, how many plurals the model knows (the CLI's only output)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    order, cursor, start = torch.randperm(len(blocks), generator=generator), 0, time.time()
    model.train()
    for step in range(steps):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(blocks), generator=generator), 0
        x = blocks[order[cursor : cursor + batch]]
        cursor += batch
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            elapsed = time.time() - start
            print(
                f"step {step + 1}/{steps}  loss {loss.item():.3f}  "
                f"{(step + 1) * x.numel() / elapsed:.0f} tok/s  {elapsed:.0f}s",
                flush=True,
            )
        if (step + 1) % max(1, steps // 4) == 0 or step == steps - 1:
            print(
                f"plural probe ('the mouse was alone. now there are two ...'): {plural_probe(model, tokenizer):.1%} "
                "of nouns",
                flush=True,
            )
            model.train()


@torch.no_grad()
def plural_probe(model, tokenizer) -> float:
    """Share of nouns whose plural the model completes greedily a sentence after the noun."""
    model.eval()
    prompts = [f"the {n.word} was alone. now there are two" for n in corpus.NOUNS]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    tokenizer.padding_side = "right"
    hits = [text.split(".")[0].strip() == n.plural for text, n in zip(texts, corpus.NOUNS)]
    return sum(hits) / len(hits)


def main(argv: list[str] | None = None) -> None:
    """Build everything from the seed and save the base model folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rounds", type=int, default=40, help="passes over the lexicon in the corpus")
    parser.add_argument("--seed", type=int, default=corpus.DEFAULT_SEED)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    docs = corpus.documents(rounds=args.rounds, seed=args.seed)
    tokenizer = train_tokenizer(docs + list(INSTRUCTIONS), VOCAB_SIZE)
    blocks = token_blocks(tokenizer, docs, args.seq_len)
    model = LlamaForCausalLM(model_config(tokenizer, max_positions=args.seq_len))
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"corpus: {len(docs)} documents, {blocks.numel()} tokens; model: {n_params / 1e6:.2f}M parameters", flush=True
    )
    train(model, tokenizer, blocks, args.steps, args.batch, args.lr, args.seed)

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
