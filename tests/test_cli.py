"""The command-line convention of tools/*.py (megatron_srp/cli.py; CONTRIBUTING.md, "Adding a
tool"): every tool and subcommand takes --config, key=value and --no-progress, figure tools
--json FILE; usage and config errors exit 2 with one line naming the key; flag tools merge
--config and key=value into their flags in the documented precedence; no progress bar without
a terminal. The tools run as real subprocesses, several at a time (each import takes seconds).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_srp import cli
from megatron_srp.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py"))
SUBCOMMANDS = {"medsafetyworld.py": ["run", "rejudge", "generate", "table"],
               "launch_nemo_run.py": ["local", "slurm"]}
# The tools (and subcommands) that print figures and so take --json FILE.
JSON_TOOLS = {"estimate_memory.py", "bench_train.py", "bench_curriculum.py", "bench_generate.py", "bench_serve.py",
              "bench_preprocess.py", "evaluate_srp.py", "attack_srp.py", "medsafetyworld.py run",
              "preprocess_srp.py", "train_classifier.py", "judge_agreement.py", "posttrain_report.py"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(args: list[str], timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout, **kw)


def _run_all(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(_run, commands))


# -- every tool's --help -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    cases = [(tool, None) for tool in TOOLS]
    cases += [(tool, sub) for tool, subs in SUBCOMMANDS.items() for sub in subs]
    done = _run_all([[f"tools/{tool}", *([sub] if sub else []), "--help"]
                     for tool, sub in cases])
    return {f"{tool} {sub}" if sub else tool: proc for (tool, sub), proc in zip(cases, done)}


def test_the_subcommands_listed_here_are_all_there_are(helps) -> None:
    for tool in TOOLS:
        proc = helps[tool]
        assert proc.returncode == 0, f"{tool} --help: {proc.stderr[-2000:]}"
        positionals = proc.stdout.partition("positional arguments:")[2].partition("\n\n")[0]
        found = re.findall(r"\{([\w,-]+)\}", positionals)
        subcommands = sorted(found[0].split(",")) if found else []
        assert subcommands == sorted(SUBCOMMANDS.get(tool, [])), \
            f"{tool}: subcommands {subcommands} in its usage; update SUBCOMMANDS"


@pytest.mark.parametrize("name", [t for t in TOOLS if t not in SUBCOMMANDS]
                         + [f"{t} {s}" for t, subs in SUBCOMMANDS.items() for s in subs])
def test_every_tool_takes_config_overrides_and_no_progress(helps, name) -> None:
    proc = helps[name]
    assert proc.returncode == 0, f"{name} --help: {proc.stderr[-2000:]}"
    text = proc.stdout
    assert "--config FILE" in text, text
    assert "--no-progress" in text, text
    assert "[key=value ...]" in text, text  # the overrides positional
    assert ("--json FILE" in text) == (name in JSON_TOOLS), text


# -- usage and config errors exit 2 with one line ----------------------------------------------

def test_usage_and_config_errors_exit_2_naming_the_key(tmp_path) -> None:
    unknown = tmp_path / "sample.yaml"
    unknown.write_text("max_new_tokens: 3\nno_such_option: 1\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("max_new_tokens: [\n")
    cases = [  # (command, what stderr must name)
        (["tools/pretrain_srp.py", "--config", "examples/tiny_cpu.yaml", "train.no_such_key=1"],
         ["train.no_such_key"]),
        (["tools/sample_srp.py", "--config", str(unknown)],
         ["no_such_option", str(unknown), "valid keys", "max_new_tokens"]),
        (["tools/sample_srp.py", "--checkpoint", str(tmp_path), "no_such_option=1"],
         ["no_such_option", "command line"]),
        (["tools/sample_srp.py", "--config", str(bad_yaml)], [str(bad_yaml), "not YAML"]),
        (["tools/sample_srp.py", "max_new_tokens=many", "--checkpoint", str(tmp_path)],
         ["max_new_tokens", "expected int"]),
        (["tools/preprocess_srp.py", "--output-prefix", str(tmp_path / "x")],
         ["--input", "input=VALUE"]),
        (["tools/make_chat_data.py", "--config", str(tmp_path / "missing.yaml")],
         ["missing.yaml", "no such file"]),
        (["tools/export_hf.py", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"),
          "dtype=float8"], ["dtype", "float8", "bfloat16"]),
        (["tools/medsafetyworld.py", "generate", "patients=40"], ["--out"]),
        (["tools/evaluate_srp.py", "--config", str(tmp_path / "missing.yaml")],
         ["missing.yaml"]),
    ]
    for (cmd, names), proc in zip(cases, _run_all([c for c, _ in cases])):
        assert proc.returncode == 2, f"{cmd}: {proc.returncode}\n{proc.stderr[-3000:]}"
        err = proc.stderr.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, \
            f"{cmd}: {err[-3000:]}"
        for name in names:
            assert name in err, f"{cmd}: {name!r} not in {err!r}"


# -- the option-config merge ---------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--input", action="append", required=True)
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--output-dir")
    out.add_argument("--output-prefix")
    p.add_argument("--variants", default="raw")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--shard-mb", type=float, default=4.0)
    p.add_argument("--out-dir", type=Path, default=Path("default"))
    p.add_argument("--strict", action="store_true")
    p.add_argument("--no-stop-at-eod", dest="stop_at_eod", action="store_false")
    p.add_argument("--method", choices=("sample", "beam"), default="sample")
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--classifier-option", action="append", default=[])
    p.add_argument("--limit", type=int, default=None)
    curriculum = p.add_argument("--curriculum")
    curriculum.yaml_text = True
    cli.add_common_args(p, example="workers", json_help="")
    return p


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "options.yaml"
    path.write_text(text)
    return str(path)


def test_precedence_defaults_then_file_then_flags_then_key_value(tmp_path) -> None:
    config = _yaml(tmp_path, "input: a.jsonl\noutput-dir: out\nworkers: 3\nshard_mb: 8\n"
                             "variants: [raw, srp]\nlimit: 5\n")
    parse = lambda *argv: cli.parse_args(_parser(), list(argv))  # noqa: E731
    args = parse("--config", config)
    assert (args.input, args.output_dir, args.workers, args.shard_mb, args.variants,
            args.limit, args.method) == (["a.jsonl"], "out", 3, 8.0, "raw,srp", 5, "sample")
    args = parse("--config", config, "--workers", "4", "--limit", "2")
    assert (args.workers, args.limit) == (4, 2)  # an explicit flag beats the file, even = default
    args = parse("workers=7", "--config", config, "--workers", "5", "limit=null")
    assert (args.workers, args.limit, args.shard_mb) == (7, None, 8.0)  # key=value beats both
    assert args.overrides == []
    args = parse("input=[x.jsonl, y.txt]", "output_prefix=p", "strict=true", "method=beam",
                 "stop_at_eod=false", "prompt=ROMEO:", "out_dir=/tmp/o", "variants=raw,tag")
    assert (args.input, args.output_prefix, args.strict, args.method, args.stop_at_eod,
            args.prompt, args.out_dir, args.variants) == (
        ["x.jsonl", "y.txt"], "p", True, "beam", False, ["ROMEO:"], Path("/tmp/o"), "raw,tag")


def test_values_take_the_form_the_flag_expects(tmp_path) -> None:
    config = _yaml(tmp_path, "input: [a]\noutput_dir: o\nclassifier_option: {threshold: 0.6, "
                             "label_key: harmful}\nprompt: 'yes'\n"
                             "curriculum: [{until: 1.0, blend: {a: 1.0}}]\n")
    args = cli.parse_args(_parser(), ["--config", config])
    assert args.classifier_option == ["threshold=0.6", "label_key=harmful"]
    assert args.prompt == ["yes"]
    assert args.curriculum == "[{until: 1.0, blend: {a: 1.0}}]"
    args = cli.parse_args(_parser(), ["input=a", "output_dir=o", "workers=2.0", "prompt=007",
                                      "json=f.jsonl", "no_progress=true"])
    assert (args.input, args.workers, args.prompt, args.json, args.no_progress) == (
        ["a"], 2, ["007"], "f.jsonl", True)


@pytest.mark.parametrize("argv, message", [
    (["nope=1"], "unknown option 'nope' in command line; valid keys: classifier_option, "
                 "curriculum, input, json, limit,"),
    (["--output-dir", "o"], "--input is required: give it as the flag, as input=VALUE, or as "
                            "'input:' in the --config file"),
    (["--input", "a"], "one of --output-dir / --output-prefix is required"),
    (["--input", "a", "--output-dir", "o", "output_prefix=p"], "give only one of --output-dir "
                                                                "/ --output-prefix"),
    (["--input", "a", "--output-dir", "o", "workers=two"], "option 'workers' (from command "
                                                           "line): expected int, got 'two'"),
    (["--input", "a", "--output-dir", "o", "workers=1.5"], "expected int, got 1.5"),
    (["--input", "a", "--output-dir", "o", "method=greedy"], "'greedy' is not one of sample, "
                                                              "beam"),
    (["--input", "a", "--output-dir", "o", "strict=maybe"], "expected true or false"),
    (["--input", "a", "--output-dir", "o", "oops"], "'oops' is not key=value"),
])
def test_errors_name_the_key_and_where_it_came_from(argv, message) -> None:
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args(_parser(), argv)
    assert message in str(info.value)


def test_file_errors_name_the_file(tmp_path) -> None:
    path = _yaml(tmp_path, "input: a\noutput_dir: o\nno-such: 1\n")
    with pytest.raises(cli.UsageError, match=f"unknown option 'no-such' in {path}; valid keys"):
        cli.parse_args(_parser(), ["--config", path])
    path = _yaml(tmp_path, "- a\n- b\n")
    with pytest.raises(cli.UsageError, match="expected a mapping of option names"):
        cli.parse_args(_parser(), ["--config", path])
    with pytest.raises(cli.UsageError, match="no such file"):
        cli.parse_args(_parser(), ["--config", str(tmp_path / "missing.yaml")])
    path = _yaml(tmp_path, "input: a\noutput_dir: o\nworkers: [1, 2]\n")
    with pytest.raises(cli.UsageError, match=f"option 'workers' \\(from {path}\\)"):
        cli.parse_args(_parser(), ["--config", path])


def test_config_tools_and_subcommands(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    cli.add_common_args(run, options=False, config_required=True, json_help="")
    gen = sub.add_parser("generate")
    gen.add_argument("--out", required=True)
    gen.add_argument("--patients", type=int, default=80)
    cli.add_common_args(gen, example="patients")
    # A config tool keeps its file and overrides for its own loader.
    args = cli.parse_args(parser, ["run", "--config", "x.yaml", "a.b=1", "--no-progress"])
    assert (args.config, args.overrides, args.no_progress) == ("x.yaml", ["a.b=1"], True)
    config = _yaml(tmp_path, "out: w\npatients: 10\n")
    args = cli.parse_args(parser, ["generate", "--config", config, "patients=40"])
    assert (args.out, args.patients) == ("w", 40)
    args = cli.parse_args(parser, ["generate", "--config", config, "--patients", "80"])
    assert (args.out, args.patients) == ("w", 80)  # the flag, though it equals the default
    with pytest.raises(cli.UsageError, match="unknown option 'seeds'"):
        cli.parse_args(parser, ["generate", "--out", "w", "seeds=[1]"])
    # key=value anywhere among the flags of a tool without subcommands
    flat = cli.add_common_args(argparse.ArgumentParser(), options=False)
    flat.add_argument("--gpus", type=int, default=1)
    args = cli.parse_args(flat, ["a=1", "--gpus", "8", "b=2"])
    assert (args.overrides, args.gpus) == (["a=1", "b=2"], 8)


def test_tool_main_progress_and_json(tmp_path, capsys, monkeypatch) -> None:
    @cli.tool_main
    def main(argv=None):
        if argv == ["config"]:
            raise ConfigError("train.lr", "must be positive\n(got -1)")
        if argv == ["work"]:
            raise RuntimeError("the work failed")
        return None

    assert main(["config"]) == 2
    assert capsys.readouterr().err == ("error: config error at 'train.lr': must be positive; "
                                       "(got -1)\n")
    assert main([]) == 0
    with pytest.raises(RuntimeError):
        main(["work"])

    class Terminal:
        def isatty(self):
            return True

    parser = cli.add_common_args(argparse.ArgumentParser(), options=False)
    assert not cli.progress_wanted(parser.parse_args([]))  # pytest's stderr is no terminal
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert cli.progress_wanted(parser.parse_args([]))
    assert not cli.progress_wanted(parser.parse_args(["--no-progress"]))

    path = tmp_path / "sub" / "figures.jsonl"
    cli.append_json(path, {"mfu": math.nan, "tokens": 3, "path": Path("/x"), "t": (1, math.inf)})
    cli.append_json(path, {"mfu": 0.5})
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"mfu": None, "tokens": 3, "path": "/x", "t": [1, None]}, {"mfu": 0.5}]
    assert "NaN" not in lines[0]


def test_make_chat_data_merges_its_options_in_order(tmp_path, shared_data) -> None:
    out = tmp_path / "chat.jsonl"
    config = tmp_path / "chat.yaml"
    config.write_text(f"source: gsm8k\noutput: {out}\nlimit: 5\n"
                      f"shared-data: {shared_data}\n")
    runs = _run_all([["tools/make_chat_data.py", "--config", str(config)],
                     ["tools/make_chat_data.py", "--config", str(config), "--limit", "3",
                      f"output={tmp_path / 'flag.jsonl'}"],
                     ["tools/make_chat_data.py", "limit=2", "--config", str(config), "--limit",
                      "3", f"output={tmp_path / 'kv.jsonl'}"]])
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    counts = [len(p.read_text().splitlines())
              for p in (out, tmp_path / "flag.jsonl", tmp_path / "kv.jsonl")]
    assert counts == [5, 3, 2]


# -- progress bars only on a terminal -----------------------------------------------------------

def _on_a_terminal(args: list[str]) -> tuple[int, str]:
    """Run a tool with stderr on a pseudo-terminal (100 columns); its stderr text."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, stderr=slave,
                              stdout=subprocess.DEVNULL, timeout=300)
    finally:
        os.close(slave)
    data = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # the terminal is closed and drained
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    return proc.returncode, data.decode(errors="replace")


def test_progress_bar_only_on_a_terminal(tmp_path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}. " + "A short line. " * 20})
                              + "\n" for i in range(20)))
    tool = ["tools/preprocess_srp.py", "--input", str(corpus), "workers=1"]
    # Two runs, not three, to keep it short: --no-progress on a terminal is
    # test_tool_main_progress_and_json's progress_wanted check.
    with ThreadPoolExecutor(max_workers=2) as pool:
        piped = pool.submit(_run, [*tool, f"output_prefix={tmp_path / 'piped'}",
                                   "--json", str(tmp_path / "summary.jsonl")])
        tty = pool.submit(_on_a_terminal, [*tool, "--output-prefix", str(tmp_path / "tty")])
        piped, tty = piped.result(), tty.result()
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert "preprocess:" not in piped.stderr and "%|" not in piped.stderr, piped.stderr
    assert tty[0] == 0 and "preprocess: 100%|" in tty[1], tty[1][-3000:]  # the test can see a bar
    summary = [json.loads(line) for line in (tmp_path / "summary.jsonl").read_text().splitlines()]
    assert len(summary) == 1 and summary[0]["documents_read"] == 20
