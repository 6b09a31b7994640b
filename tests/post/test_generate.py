"""Generate: the adapter on its 4-bit base, prompts in the training template, base answers to compare."""

from __future__ import annotations

import pytest

from qlora.config.errors import run_cli


@pytest.fixture(scope="module")
def run(trained_run):
    from qlora.post.export import read_run

    return read_run(trained_run)


def test_prompt_is_bos_plus_the_alpaca_template_unless_raw(run):
    from transformers import AutoTokenizer

    from qlora.data.prepare import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
    from qlora.post.generate import format_prompt

    tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir)
    assert format_prompt(run, tokenizer, " Say the next number. ") == "<s>" + ALPACA_PROMPT_NO_INPUT.format(
        instruction="Say the next number."
    )
    assert format_prompt(run, tokenizer, "Say the next number.", "four") == "<s>" + ALPACA_PROMPT.format(
        instruction="Say the next number.", input="four"
    )
    assert format_prompt(run, tokenizer, "one two", raw=True) == "<s>one two"


def test_answers_come_from_the_adapter_and_differ_from_the_base(run):
    from qlora.data.prepare import Example
    from qlora.post.generate import format_prompt, generate, load_adapted_model
    from qlora.training.metrics import exact_match

    results = generate(
        run, ["Say the next number.", "Say the next number."], ["four", "nine"], max_new_tokens=6, compare=True
    )
    assert [r["prompt"] for r in results] == ["Say the next number.", "Say the next number."]
    assert all(isinstance(r["adapter"], str) and isinstance(r["base"], str) for r in results)
    assert any(
        r["adapter"] != r["base"] for r in results
    )  # the adapter (trained at a high rate) changes greedy output
    # the same prompt through the trainer's own metric path gives the same greedy answer
    model, tokenizer = load_adapted_model(run)
    prompt = format_prompt(run, tokenizer, "Say the next number.", "four").removeprefix("<s>")
    assert exact_match(model, tokenizer, [Example(prompt, results[0]["adapter"])], max_new_tokens=6) == 1.0


def test_cli_prints_prompt_and_answer(run, capsys):
    from qlora.generate import main

    assert run_cli(main, [str(run.out_dir), "--prompt", "Say the next number.", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### prompt\nSay the next number.\n### adapter\n") and "### base" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{missing}", "--prompt", "x"], "run folder not found"),
        (["{run}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
        (
            ["{run}", "--prompt", "x", "--prompt", "y", "--input", "z"],
            "--input: give one per --prompt (got 2 prompts, 1 inputs)",
        ),
    ],
)
def test_user_mistakes_are_one_line_errors(run, tmp_path, capsys, argv, message):
    from qlora.generate import main

    argv = [a.format(run=run.out_dir, missing=tmp_path / "nope") for a in argv]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
