"""`qlora generate OUT --prompt "..."`: a quick look at what a run learned, on the 4-bit base + adapter
(a classifier answers with its most likely label).

The base is loaded exactly as the trainer loaded it (same recipe, same BitsAndBytesConfig, same
compute dtype), and prompts get the template the adapter was trained with, so the answers are the
ones the run's metrics describe.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from qlora.errors import QLoraError, run_cli
from qlora.export import TrainedRun, read_run


def load_run_base(run: TrainedRun, compute_dtype, tokenizer, device: str | None = None):
    """The base as training loaded it: the same quantization, and for a classifier its labels and pad id."""
    from qlora.model import load_base_model

    return load_base_model(run.recipe, compute_dtype, run.label_names, pad_token_id=tokenizer.pad_token_id, device=device)


def load_adapted_model(run: TrainedRun, device: str | None = None):
    """(peft model on the 4-bit base as trained, the run's tokenizer), in eval mode."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qlora.model import quiet_peft_deprecations
    from qlora.precision import resolve_compute_dtype

    tokenizer = AutoTokenizer.from_pretrained(str(run.adapter_dir))
    base = load_run_base(run, resolve_compute_dtype(run.recipe.quantization.compute_dtype), tokenizer, device)
    with quiet_peft_deprecations():
        model = PeftModel.from_pretrained(base, str(run.adapter_dir))
    return model.eval(), tokenizer


def format_prompt(run: TrainedRun, tokenizer, instruction: str, context: str = "", raw: bool = False) -> str:
    """The full text the model sees for `instruction` (+ `context`): the run's training format, BOS included.

    Alpaca goes through the data module's own formatter and chat through the tokenizer's template (which
    writes its own BOS), so prompts here match the prompts training and its metrics used.
    """
    from qlora.data import format_alpaca
    from qlora.recipe import DataSpec

    fmt = run.recipe.data.format
    if fmt == "chat" and not raw:
        content = f"{instruction.strip()}\n\n{context.strip()}".strip()
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    if fmt == "alpaca" and not raw:
        text = format_alpaca({"instruction": instruction, "input": context, "output": ""}, DataSpec()).prompt
    else:
        text = f"{instruction}\n\n{context}" if context else instruction
    return (tokenizer.bos_token or "") + text


def generate(run: TrainedRun, prompts: list[str], inputs: list[str] | None = None, max_new_tokens: int = 128,
             raw: bool = False, compare: bool = False) -> list[dict[str, str]]:
    """Greedy answers per prompt: {'prompt', 'adapter'} and, with `compare`, the base's {'base'}."""
    from qlora.metrics import generate_answers

    inputs = inputs or [""] * len(prompts)
    if len(inputs) != len(prompts):
        raise QLoraError(f"--input: give one per --prompt (got {len(prompts)} prompts, {len(inputs)} inputs)")
    model, tokenizer = load_adapted_model(run)
    texts = [format_prompt(run, tokenizer, p, c, raw) for p, c in zip(prompts, inputs)]

    def answers() -> list[str]:
        if run.label_names:
            return classify(model, tokenizer, texts, run.label_names)
        return generate_answers(model, tokenizer, texts, max_new_tokens, add_bos=False)  # BOS is in the text

    results = [{"prompt": p, "adapter": a} for p, a in zip(prompts, answers())]
    if compare:
        with model.disable_adapter():
            for result, base_answer in zip(results, answers()):
                result["base"] = base_answer
    return results


def classify(model, tokenizer, texts: list[str], labels: list[str]) -> list[str]:
    """A classifier's answer per text: its most likely label and that label's probability."""
    import torch

    answers = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding, so the pooled token is the text's last
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
            probs = model(input_ids=ids).logits[0].float().softmax(-1)
            best = int(probs.argmax())
            answers.append(f"{labels[best]} ({probs[best]:.0%})")
    return answers


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(prog="qlora generate", description="Generate with a trained adapter on its 4-bit base.")
    parser.add_argument("run", help="a `qlora train` output folder")
    parser.add_argument("--prompt", action="append", required=True, help="an instruction, or for a classifier a text to label (repeatable)")
    parser.add_argument("--input", dest="inputs", action="append", help="the instruction's input/context (one per --prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default 128)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the training template")
    parser.add_argument("--compare", action="store_true", help="also show the base model's answer (adapter off)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_new_tokens < 1:
        raise QLoraError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    from qlora.oom import OutOfMemoryExit

    advice = ["give fewer or shorter --prompt values, or a smaller --max-new-tokens"]
    with OutOfMemoryExit("generation", advice):
        results = generate(read_run(args.run), args.prompt, args.inputs, args.max_new_tokens, args.raw, args.compare)
    for result in results:
        print(f"### prompt\n{result['prompt']}")
        if "base" in result:
            print(f"### base\n{result['base'].strip()}")
        print(f"### adapter\n{result['adapter'].strip()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
