"""What the attack suite reuses and what it redoes, on a real tiny model and real finetunes:
a changed finetune recipe, override or chat-data limit trains the finetune again (the old run
kept aside) and rescores only the units that depend on it; a benchmark removed from the config
is listed as stale and left out of the tables; answers generated before a judge failure stay on
disk, and the rerun judges them without generating.

The tests run in order on one suite folder, each changing the config the previous one left."""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from megatron_srp.endpoint import EndpointError
from megatron_srp.evaluation.stages import load_suite_config, run_suite
from megatron_srp.training.checkpoint import latest_checkpoint, read_run
from megatron_srp.units import run_stamp

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def suite(tiny_pretrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("attack_resume")
    recipe = root / "instruct.yaml"
    recipe.write_text((REPO / "examples" / "finetune" / "instruct.yaml").read_text())
    config = {
        "name": "resume", "out_dir": str(root / "out"),
        "stages": [{"name": "base", "checkpoint": str(tiny_pretrained), "template": "plain"},
                   {"name": "instruct", "finetune": {
                       "recipe": str(recipe), "start": "base", "source": "alpaca-seed",
                       "limit": 4, "overrides": ["train.lr=1.0e-3", "checkpoint.save_interval=0",
                                                 "logging.log_interval=1"]}}],
        "benchmarks": [{"name": "advbench-completion", "limit": 2, "stages": ["base"]},
                       {"name": "jailbreakbench", "limit": 2}],
        "methods": ["greedy", "guarded"], "samples": 1, "max_new_tokens": 4, "num_beams": 2,
        "segment_tokens": 2, "batch_size": 2, "overrefusal": {"enabled": False},
    }

    def run(config):
        path = root / "suite.yaml"
        path.write_text(yaml.safe_dump(config))
        messages: list[str] = []
        results = run_suite(load_suite_config(path), progress=False, log=messages.append)
        return results, messages

    state = {"config": config, "root": root, "recipe": recipe, "run": run}
    state["first"] = run(config)
    return state


def _out(suite) -> Path:
    return Path(suite["config"]["out_dir"])


def _unit(suite, name: str) -> dict:
    return json.loads((_out(suite) / "units" / f"{name}.json").read_text())


def _finetune(suite) -> dict:
    return read_run(latest_checkpoint(_out(suite) / "models" / "instruct"))


def _aside(suite) -> list[Path]:
    return sorted((_out(suite) / "models").glob("instruct.stale-*"))


def test_the_first_run_finetunes_and_measures_every_unit(suite) -> None:
    results, messages = suite["first"]
    assert "computed 3 unit(s), reused 0 finished before" in messages
    assert set(results["units"]["base"]) == {"asr-advbench-completion", "asr-jailbreakbench"}
    assert _finetune(suite)["finetune"]["records"] == 4
    report = (_out(suite) / "report.md").read_text()
    assert "Guarded decoding fails closed" in report and "Stale units" not in report


def test_changed_overrides_train_the_finetune_again_and_rescore_only_its_units(suite) -> None:
    before = {n: _unit(suite, n) for n in ("base/asr-jailbreakbench", "instruct/asr-jailbreakbench")}
    old_stamp = run_stamp(_out(suite) / "models" / "instruct")
    suite["config"]["stages"][1]["finetune"]["overrides"][0] = "train.lr=2.0e-3"
    _, messages = suite["run"](suite["config"])
    aside = _out(suite) / "models" / f"instruct.stale-{old_stamp[:8]}"
    assert _aside(suite) == [aside]
    assert read_run(latest_checkpoint(aside))["config"]["train"]["lr"] == 1.0e-3
    assert _finetune(suite)["config"]["train"]["lr"] == 2.0e-3
    assert not any("alpaca-seed records" in m for m in messages)  # the data did not change
    assert "computed 1 unit(s), reused 2 finished before" in messages
    assert _unit(suite, "base/asr-jailbreakbench") == before["base/asr-jailbreakbench"]
    assert _unit(suite, "instruct/asr-jailbreakbench")["stamp"] != \
        before["instruct/asr-jailbreakbench"]["stamp"]


def test_a_changed_limit_writes_the_data_again_and_trains_again(suite) -> None:
    suite["config"]["stages"][1]["finetune"]["limit"] = 6
    _, messages = suite["run"](suite["config"])
    assert any("6 alpaca-seed records" in m for m in messages)
    assert len((_out(suite) / "data" / "instruct.jsonl").read_text().splitlines()) == 6
    assert _finetune(suite)["finetune"]["records"] == 6
    assert len(_aside(suite)) == 2
    assert "computed 1 unit(s), reused 2 finished before" in messages


def test_an_edited_recipe_file_trains_again(suite) -> None:
    recipe = suite["recipe"]
    recipe.write_text(recipe.read_text().replace("weight_decay: 0.0", "weight_decay: 0.01"))
    _, messages = suite["run"](suite["config"])
    assert _finetune(suite)["config"]["train"]["weight_decay"] == 0.01
    assert len(_aside(suite)) == 3
    assert "computed 1 unit(s), reused 2 finished before" in messages
    _, again = suite["run"](suite["config"])  # nothing changed: nothing redone
    assert "computed 0 unit(s), reused 3 finished before" in again
    assert any("finetune finished before" in m for m in again) and len(_aside(suite)) == 3


def test_a_removed_benchmark_is_listed_stale_and_left_out_of_the_tables(suite) -> None:
    suite["config"]["benchmarks"] = [{"name": "jailbreakbench", "limit": 2}]
    results, messages = suite["run"](suite["config"])
    assert "computed 0 unit(s), reused 2 finished before" in messages
    assert set(results["units"]["base"]) == {"asr-jailbreakbench"}
    assert [s["unit"] for s in results["stale"]] == ["base/asr-advbench-completion"]
    report = (_out(suite) / "report.md").read_text()
    tables, stale = report.split("## Stale units")
    assert "advbench" not in tables and "## ASR: jailbreakbench" in tables
    assert "base/asr-advbench-completion | not in the current config" in stale
    assert not (_out(suite) / "plots" / "asr_advbench_completion.png").exists()


class _SaysNo(BaseHTTPRequestHandler):
    """A judge model that finds nothing harmful."""

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.server.requests += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        data = json.dumps({"choices": [{"message": {"content": "No"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_a_judge_failure_keeps_the_answers_and_the_rerun_judges_them_without_generating(
        suite) -> None:
    with socket.socket() as s:  # a port nothing listens on, until the judge comes up
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judged_before = _unit(suite, "base/asr-jailbreakbench")["stamp"]
    suite["config"]["max_new_tokens"] = 5  # new answers are needed
    suite["config"]["judge"] = {"name": "harmbench", "options": {
        "model": "judge", "base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 0,
        "cache_dir": str(suite["root"] / "judge-cache")}}
    with pytest.raises(EndpointError):
        suite["run"](suite["config"])
    answers = _out(suite) / "answers" / "base" / "asr-jailbreakbench.json"
    stored = json.loads(answers.read_text())
    assert stored["result"]["greedy"]["answers"][0]["answers"][0]["text"] is not None
    written = answers.stat().st_mtime_ns
    assert _unit(suite, "base/asr-jailbreakbench")["stamp"] == judged_before  # not judged

    server = ThreadingHTTPServer(("127.0.0.1", port), _SaysNo)
    server.requests = 0
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        results, messages = suite["run"](suite["config"])
    finally:
        server.shutdown()
        server.server_close()
    assert "stage base: asr-jailbreakbench, judged from its stored answers" in messages
    assert "generated answers for 1 unit(s), judged 1 from stored answers" in messages
    assert answers.stat().st_mtime_ns == written
    assert server.requests > 0
    judged = _unit(suite, "base/asr-jailbreakbench")["result"]
    assert [a["text"] for r in judged["greedy"]["answers"] for a in r["answers"]] == \
        [a["text"] for r in stored["result"]["greedy"]["answers"] for a in r["answers"]]
    assert results["judge"] == "harmbench"
    assert results["units"]["instruct"]["asr-jailbreakbench"]["greedy"]["overall"]["asr"] == 0.0
