"""Check that a change left `qlora profile --format json`'s byte figures exactly as they were.

`python benchmarks/compare_profiles.py` exports the base revision (default `1e0f47d`, the last commit
before the package was split into layered subpackages) with `git archive` into a temporary folder and
runs `python -m qlora.profile --format json`, with this interpreter, once from that folder and once
from this checkout, for:

- every shipped recipe, `recipes/*.yaml` (one `--recipe` each), and
- `--model` llama-3.1-8b, mistral-7b, qwen2.5-14b and llama-3.1-70b, each with
  `--methods full,lora,qlora --seq-len 2048 --rank 16`.

Each side runs with `PYTHONPATH` set to its own root and that root as the working folder (so the
recipes' relative paths resolve there), and both with the same `QLORA_MEASURED_DIR` (this checkout's
`qlora/memory/measured`), so that the measured CUDA overheads cannot differ by checkout.

Only the byte figures are compared: every result's `bytes` dict, `total_bytes` and `allocated_bytes`,
and the same three for each of its `phases` when both sides report phases. Anything else (labels,
module paths in text, advice) may differ; a `same` line says so when it does. One line is printed per
command, `same` or the differing figures with both values, and the exit status is 0 when every command
is the same, 1 otherwise (a command that fails on either side counts as a difference).

    python benchmarks/compare_profiles.py                    # against 1e0f47d, about 3 minutes on a CPU
    python benchmarks/compare_profiles.py --base HEAD~3 --out /tmp/profiles   # keeps base/ and current/ JSON
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE = "1e0f47d"
MODELS = ("llama-3.1-8b", "mistral-7b", "qwen2.5-14b", "llama-3.1-70b")
MODEL_ARGS = ("--methods", "full,lora,qlora", "--seq-len", "2048", "--rank", "16")
FIGURES = ("total_bytes", "allocated_bytes")  # besides every entry of the `bytes` dict
TIMEOUT_S = 900
ERROR_LINES = 6  # lines of a failing command's stderr shown in its line


def commands(root: Path = REPO) -> list[list[str]]:
    """The profiler arguments to compare: one `--recipe` per shipped recipe, then the four models."""
    recipes = [["--recipe", path.relative_to(root).as_posix()] for path in sorted((root / "recipes").glob("*.yaml"))]
    return recipes + [["--model", model, *MODEL_ARGS] for model in MODELS]


def _figures(entry: dict, prefix: str, out: dict[str, Any]) -> None:
    for name, value in (entry.get("bytes") or {}).items():
        out[f"{prefix}bytes.{name}"] = value
    for name in FIGURES:
        if name in entry:
            out[f"{prefix}{name}"] = entry[name]


def byte_figures(output: dict) -> tuple[dict[str, Any], set[str]]:
    """The byte figures of one profiler JSON output, flat, and the results that report phases.

    Keys are positional (`runs[0].results[2]/qlora.bytes.weights`, `….phases.eval.total_bytes`), so a
    renamed model label or path in the text does not count as a difference.
    """
    figures: dict[str, Any] = {}
    with_phases: set[str] = set()
    for i, run in enumerate(output.get("runs") or []):
        for j, result in enumerate(run.get("results") or []):
            label = f"runs[{i}].results[{j}]/{result.get('method')}"
            _figures(result, f"{label}.", figures)
            phases = result.get("phases")
            if isinstance(phases, dict) and phases:
                with_phases.add(label)
                for phase, entry in phases.items():
                    _figures(entry, f"{label}.phases.{phase}.", figures)
    return figures, with_phases


def compare_outputs(base: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(key, base value, current value) for every byte figure that differs; [] when all are the same.

    A figure only one side has counts as a difference (its other value is None), except phase figures
    of a result whose other side reports no phases at all.
    """
    base_figures, base_phased = byte_figures(base)
    current_figures, current_phased = byte_figures(current)
    both_phased = base_phased & current_phased
    differences = []
    for key in sorted(base_figures.keys() | current_figures.keys()):
        label, phase_key, _ = key.partition(".phases.")
        if phase_key and label not in both_phased:
            continue
        old, new = base_figures.get(key), current_figures.get(key)
        if old != new or type(old) is not type(new):
            differences.append((key, old, new))
    return differences


def other_differences(base: Any, current: Any, path: str = "") -> list[str]:
    """Paths of the non-figure values that differ (reported, never counted)."""
    if isinstance(base, dict) and isinstance(current, dict):
        out = []
        for key in sorted(base.keys() | current.keys(), key=str):
            if key in ("bytes", *FIGURES) and ".results[" in path:
                continue  # a result's (or one of its phases') figures: compared by compare_outputs
            sub = f"{path}.{key}" if path else str(key)
            if key not in base or key not in current:
                out.append(sub)
            else:
                out.extend(other_differences(base[key], current[key], sub))
        return out
    if isinstance(base, list) and isinstance(current, list):
        if len(base) != len(current):
            return [f"{path} (length {len(base)} vs {len(current)})"]
        out = []
        for i, (a, b) in enumerate(zip(base, current)):
            out.extend(other_differences(a, b, f"{path}[{i}]"))
        return out
    return [] if base == current else [path]


def describe(differences: list[tuple[str, Any, Any]]) -> str:
    parts = []
    for key, old, new in differences:
        delta = f" (Δ {new - old:+,})" if isinstance(old, int) and isinstance(new, int) else ""
        parts.append(f"{key}: base={old} current={new}{delta}")
    return "; ".join(parts)


def export(rev: str, dest: Path, repo: Path = REPO) -> None:
    """`git archive REV | tar -x -C dest`: the revision's files, without touching the repository."""
    archive = subprocess.Popen(["git", "-C", str(repo), "archive", "--format=tar", rev], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout)
    archive.stdout.close()
    if archive.wait() != 0 or tar.returncode != 0:
        raise SystemExit(f"could not export {rev} from {repo}")


def environment(root: Path, measured: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root)  # this root only: the other checkout's package must not leak in
    env["QLORA_MEASURED_DIR"] = str(measured)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave no __pycache__ in either tree
    return env


def check_import(root: Path, env: dict[str, str]) -> None:
    """Stop if `import qlora` from `root` would find another checkout's package (an editable install)."""
    found = subprocess.run(
        [sys.executable, "-c", "import qlora; print(qlora.__file__)"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    path = Path(found.stdout.strip() or "?").resolve()
    if found.returncode != 0 or not path.is_relative_to(root.resolve()):
        raise SystemExit(f"`import qlora` from {root} found {path}: {found.stderr.strip()}")


def profile(args: Sequence[str], root: Path, env: dict[str, str]) -> tuple[dict | None, str, str]:
    """(parsed JSON or None, raw stdout, error text) of `python -m qlora.profile --format json ARGS` in `root`."""
    cmd = [sys.executable, "-m", "qlora.profile", "--format", "json", *args]
    try:
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, "", f"timed out after {TIMEOUT_S} s"
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-ERROR_LINES:])
        return None, done.stdout, f"exit {done.returncode}: {tail}"
    try:
        return json.loads(done.stdout), done.stdout, ""
    except json.JSONDecodeError as exc:
        return None, done.stdout, f"output is not JSON ({exc})"


def slug(args: Sequence[str]) -> str:
    name = Path(args[1]).stem if args[0] == "--recipe" else args[1]
    return f"{args[0].lstrip('-')}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base", default=DEFAULT_BASE, metavar="REV", help=f"revision to compare against (default {DEFAULT_BASE})"
    )
    parser.add_argument("--out", type=Path, metavar="DIR", help="keep the JSON outputs in DIR/base and DIR/current")
    opts = parser.parse_args(argv)

    measured = REPO / "qlora" / "memory" / "measured"  # package data (memory_reports/measured before 0.1.0's wheel)
    all_same = True
    with tempfile.TemporaryDirectory(prefix="qlora-base-") as tmp:
        base_root = Path(tmp)
        export(opts.base, base_root)
        sides = {"base": base_root, "current": REPO}
        envs = {side: environment(root, measured) for side, root in sides.items()}
        for side, root in sides.items():
            check_import(root, envs[side])
        if opts.out:
            for side in sides:
                (opts.out / side).mkdir(parents=True, exist_ok=True)
        print(f"base {opts.base} vs current tree {REPO}; QLORA_MEASURED_DIR={measured}", flush=True)
        for args in commands():
            label = " ".join(args[:2])
            outputs, errors = {}, {}
            for side, root in sides.items():
                outputs[side], raw, errors[side] = profile(args, root, envs[side])
                if opts.out:
                    (opts.out / side / f"{slug(args)}.json").write_text(raw)
            if errors["base"] or errors["current"]:
                all_same = False
                failed = "; ".join(f"{side} failed ({error})" for side, error in errors.items() if error)
                print(f"{label}: ERROR {failed}", flush=True)
                continue
            differences = compare_outputs(outputs["base"], outputs["current"])
            if differences:
                all_same = False
                print(f"{label}: DIFFERENT {describe(differences)}", flush=True)
            else:
                other = other_differences(outputs["base"], outputs["current"])
                note = (
                    f" (non-byte fields differ: {', '.join(other[:5])}{', …' if len(other) > 5 else ''})"
                    if other
                    else ""
                )
                print(f"{label}: same{note}", flush=True)
    print("all byte figures identical" if all_same else "byte figures differ (see above)")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
