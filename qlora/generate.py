"""`qlora generate OUT --prompt "..."`: a quick look at what a run learned, on the 4-bit base + adapter.

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


def check_causal(run: TrainedRun, what: str) -> None:
    if run.recipe.task != "causal_lm":
        raise QLoraError(f"{what}: task '{run.recipe.task}' is not supported (only causal_lm runs)")


def load_adapted_model(run: TrainedRun):
    """(peft model on the 4-bit base as trained, the run's tokenizer), in eval mode."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qlora.model import load_base_model
    from qlora.precision import resolve_compute_dtype

    base = load_base_model(run.recipe, resolve_compute_dtype(run.recipe.quantization.compute_dtype))
    model = PeftModel.from_pretrained(base, str(run.adapter_dir))
    return model.eval(), AutoTokenizer.from_pretrained(str(run.adapter_dir))


def format_prompt(run: TrainedRun, text: str, raw: bool = False) -> str:
    """`text` as an instruction in the run's prompt template (as is for raw prompts or other formats)."""
    from qlora.data import ALPACA_PROMPT_NO_INPUT

    if raw or run.recipe.data.format != "alpaca":
        return text
    return ALPACA_PROMPT_NO_INPUT.format(instruction=text.strip())


def generate(run: TrainedRun, prompts: list[str], max_new_tokens: int = 128, raw: bool = False,
             compare: bool = False) -> list[dict[str, str]]:
    """Greedy answers per prompt: {'prompt', 'adapter'} and, with `compare`, the base's {'base'}."""
    from qlora.metrics import generate_answers

    check_causal(run, "generate")
    model, tokenizer = load_adapted_model(run)
    texts = [format_prompt(run, p, raw) for p in prompts]
    results = [{"prompt": p, "adapter": a} for p, a in zip(prompts, generate_answers(model, tokenizer, texts, max_new_tokens))]
    if compare:
        with model.disable_adapter():
            for result, answer in zip(results, generate_answers(model, tokenizer, texts, max_new_tokens)):
                result["base"] = answer
    return results


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(prog="qlora generate", description="Generate with a trained adapter on its 4-bit base.")
    parser.add_argument("run", help="a `qlora train` output folder")
    parser.add_argument("--prompt", action="append", required=True, help="an instruction (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default 128)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the training template")
    parser.add_argument("--compare", action="store_true", help="also show the base model's answer (adapter off)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_new_tokens < 1:
        raise QLoraError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    for result in generate(read_run(args.run), args.prompt, args.max_new_tokens, args.raw, args.compare):
        print(f"### prompt\n{result['prompt']}")
        if "base" in result:
            print(f"### base\n{result['base'].strip()}")
        print(f"### adapter\n{result['adapter'].strip()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
