"""Export: a Hub-ready folder (safetensors adapter + model card), the Hub push, and token safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora.config.errors import QLoraError, run_cli


@pytest.fixture(scope="module")
def run(trained_run):
    from qlora.post.export import read_run

    return read_run(trained_run)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    from qlora.post.export import export

    to = tmp_path_factory.mktemp("exported") / "folder"
    export(run, to)
    return to


def card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def test_folder_holds_safetensors_adapter_tokenizer_and_card_only(exported, run):
    names = {p.name for p in exported.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert (exported / "adapter_model.safetensors").read_bytes() == (
        run.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()


def test_card_front_matter_names_base_library_and_tags(exported, tiny_llama):
    data = card(exported).data
    assert data.base_model == tiny_llama.name  # a local base: its folder name (a push needs --base-model)
    assert data.library_name == "peft"
    assert {"qlora", "lora", "peft"} <= set(data.tags)
    assert data.pipeline_tag == "text-generation"


def test_card_body_reports_recipe_data_metrics_lora_and_memory(exported, run):
    text = card(exported).text
    m = run.metrics
    assert f"| loss | {m['eval_loss_before']:.4f} | {m['eval_loss_after']:.4f} |" in text
    assert f"| exact_match | {m['eval_exact_match_before']:.4f} | {m['eval_exact_match_after']:.4f} |" in text
    assert f"examples: {m['data']['train_examples']} train, {m['data']['eval_examples']} eval" in text
    assert "| r | 4 |" in text and "| alpha | 8 |" in text
    assert f"| trainable params | {m['trainable_params']:,} of {m['total_params']:,}" in text
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in text
    assert f"({m['peak_memory_bytes']:,} bytes)" in text
    assert "learning_rate: 0.05" in text and "max_steps: 3" in text
    assert str(run.out_dir.parent) not in text  # local paths are cut to names


def test_exported_folder_loads_with_peft(exported):
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(exported)
    assert model.peft_config["default"].r == 4


def fake_profiler(monkeypatch, seen=None, total=123 * 2**20, allocated=100 * 2**20):
    import types

    import qlora.post.model_card

    found = types.SimpleNamespace(total=total, allocated=allocated)

    def estimate_recipe(recipe):
        if isinstance(found.total, Exception):
            raise found.total
        if seen is not None:
            seen.append((recipe.model.name_or_path, recipe.method))
        return found

    monkeypatch.setattr(qlora.post.model_card, "estimate_recipe", estimate_recipe)
    return found


def test_predicted_peak_comes_from_the_profiler(run, monkeypatch):
    from qlora.post.model_card import render_card

    seen = []
    fake_profiler(monkeypatch, seen)
    text = render_card(run, "org/base", None)
    assert "(`qlora profile --recipe`, `allocated_bytes`) | 100.00 MiB (104,857,600 bytes) |" in text
    assert "allocator slack (`total_bytes`) | 123.00 MiB (128,974,848 bytes) |" in text
    assert (
        "| measured: peak resident memory of the CPU process (Python, libraries, CPU tensors; not comparable" in text
    )
    assert seen == [(run.recipe.model.name_or_path, "qlora")]
    found = fake_profiler(monkeypatch)
    found.total = QLoraError("unknown model")  # a model the profiler cannot place
    assert "(`qlora profile --recipe`, `allocated_bytes`) | not available |" in render_card(run, "org/base", None)


def test_a_gpu_run_compares_predicted_tensors_with_allocated_plus_paged(run, monkeypatch):
    """Like with like: the tensors-only prediction against max_memory_allocated + paged states, each labelled."""
    import dataclasses

    from qlora.post.model_card import memory_section

    fake_profiler(monkeypatch, total=11 * 2**30, allocated=10 * 2**30)
    metrics = dict(
        run.metrics,
        device="cuda",
        peak_memory_bytes=int(9.8 * 2**30),
        peak_memory_allocated_bytes=int(8.8 * 2**30),
        paged_optimizer_bytes=2**30,
        peak_memory_reserved_bytes=int(9.5 * 2**30),
    )
    recipe = dataclasses.replace(run.recipe, target_gpu="t4")
    text = "\n".join(memory_section(recipe, metrics))
    assert "| measured: tensors in PyTorch's allocator (`torch.cuda.max_memory_allocated`) | 8.80 GiB" in text
    assert "| measured: paged optimizer states (bitsandbytes, outside PyTorch's allocator) | 1.00 GiB" in text
    assert "| measured: tensors + paged states, compare with predicted tensors (prediction +2.0 %) | 9.80 GiB" in text
    assert "(`torch.cuda.max_memory_reserved`; no CUDA context) | 9.50 GiB" in text
    assert "allocator slack (`total_bytes`, sized for a t4 GPU) | 11.00 GiB" in text
    assert "resident" not in text


def test_base_model_id_and_license_go_to_card_and_adapter_config(run, tmp_path):
    from qlora.post.export import export

    export(run, tmp_path / "x", base_model="org/tiny-llama", license_id="apache-2.0")
    data = card(tmp_path / "x").data
    assert (data.base_model, data.license) == ("org/tiny-llama", "apache-2.0")
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-llama"


def test_license_is_read_from_a_local_base_card(tmp_path):
    from qlora.config.recipe import ModelSpec
    from qlora.post.model_card import base_license

    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    assert base_license(ModelSpec(name_or_path=str(tmp_path)), None) == "mit"
    assert base_license(ModelSpec(name_or_path=str(tmp_path / "missing")), None) is None


class FakeHfApi:
    """Records what a push would send; keeps a copy of the folder (export deletes its staging)."""

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.calls.append(("upload_folder", repo_id, files))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


def test_hub_push_uploads_the_folder_and_never_leaks_the_token(run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from qlora.export import main

    monkeypatch.setenv("HF_TOKEN", "secret-xyz")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    argv = [
        str(run.out_dir),
        "--to",
        str(tmp_path / "x"),
        "--hub",
        "alice/tiny-qlora",
        "--private",
        "--base-model",
        "org/tiny-llama",
    ]
    assert run_cli(main, argv) == 0
    (_, repo, kwargs), (_, uploaded_repo, files) = FakeHfApi.calls
    assert repo == uploaded_repo == "alice/tiny-qlora" and kwargs["private"] is True
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()}
    assert 'from_pretrained("alice/tiny-qlora")' in files["README.md"].decode()
    out = capsys.readouterr()
    assert f"exported {run.out_dir} -> {tmp_path / 'x'} (base_model: org/tiny-llama)" in out.out
    assert "https://huggingface.co/alice/tiny-qlora" in out.out
    leaks = [name for name, data in files.items() if b"secret-xyz" in data]
    leaks += [p.name for p in (tmp_path / "x").iterdir() if b"secret-xyz" in p.read_bytes()]
    assert not leaks and "secret-xyz" not in out.out + out.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hub", "alice/x"], "--base-model: the base is the local folder"),
        (["--hub", "not a repo", "--base-model", "org/m"], "--hub: 'not a repo' is not a valid repo id"),
        (["--to", "{run}"], "would replace the run folder"),
        (["--private", "--to", "{tmp}/y"], "--private applies to --hub only"),
        ([], "nothing to do"),
        (["--to", "{tmp}/y", "--base-model", "bad id!"], "--base-model: 'bad id!' is not a Hub model id"),
    ],
)
def test_user_mistakes_are_one_line_errors(run, tmp_path, capsys, argv, message, monkeypatch):
    from qlora.export import main

    monkeypatch.setenv("HF_TOKEN", "secret-xyz")
    argv = [a.format(run=run.out_dir, tmp=tmp_path) for a in argv]
    assert run_cli(main, [str(run.out_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "y").exists()


def test_push_without_a_token_says_how_to_log_in(run, monkeypatch):
    import huggingface_hub

    from qlora.post.export import export

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(QLoraError, match="no Hugging Face token; set HF_TOKEN or run `hf auth login`"):
        export(run, None, hub="alice/x", base_model="org/m")


def test_existing_folder_needs_overwrite(run, exported):
    from qlora.post.export import export

    with pytest.raises(QLoraError, match="already exists and is not empty; pass --overwrite"):
        export(run, exported)
    export(run, exported, overwrite=True)
    assert (exported / "README.md").exists()


def test_unfinished_run_names_the_missing_file(tmp_path):
    from qlora.post.export import read_run

    (tmp_path / "recipe.yaml").write_text("{}")
    with pytest.raises(QLoraError, match="has no adapter/adapter_config.json: not a finished `qlora train` run"):
        read_run(tmp_path)
