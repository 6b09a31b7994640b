"""Generate: the adapter on its 4-bit base, prompts in the training template, base answers to compare."""

from __future__ import annotations

import pytest

from qlora.errors import run_cli
from test_export import session_run  # the session's real tiny run folder, see test_export.py


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama, alpaca_file):
    from qlora.export import read_run

    return read_run(session_run(tmp_path_factory, tiny_llama, alpaca_file))


def test_prompt_gets_the_alpaca_template_unless_raw(run):
    from qlora.data import ALPACA_PROMPT_NO_INPUT
    from qlora.generate import format_prompt

    assert format_prompt(run, " Say the next number. ") == ALPACA_PROMPT_NO_INPUT.format(instruction="Say the next number.")
    assert format_prompt(run, "one two", raw=True) == "one two"


def test_answers_come_from_the_adapter_and_differ_from_the_base(run):
    from qlora.generate import format_prompt, generate, load_adapted_model
    from qlora.metrics import generate_answers

    results = generate(run, ["Say the next number.", "one two three"], max_new_tokens=6, compare=True)
    assert [r["prompt"] for r in results] == ["Say the next number.", "one two three"]
    assert all(isinstance(r["adapter"], str) and isinstance(r["base"], str) for r in results)
    assert any(r["adapter"] != r["base"] for r in results)  # the adapter (trained at a high rate) changes greedy output
    model, tokenizer = load_adapted_model(run)
    again = generate_answers(model, tokenizer, [format_prompt(run, "Say the next number.")], max_new_tokens=6)
    assert again == [results[0]["adapter"]]  # greedy: the CLI's answer is the model's


def test_cli_prints_prompt_and_answer(run, capsys):
    from qlora.generate import main

    assert run_cli(main, [str(run.out_dir), "--prompt", "Say the next number.", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### prompt\nSay the next number.\n### adapter\n") and "### base" not in out


@pytest.mark.parametrize("argv, message", [
    (["{missing}", "--prompt", "x"], "run folder not found"),
    (["{run}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
])
def test_user_mistakes_are_one_line_errors(run, tmp_path, capsys, argv, message):
    from qlora.generate import main

    argv = [a.format(run=run.out_dir, missing=tmp_path / "nope") for a in argv]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
