"""The ``gradsel`` CLI as a whole: ``--version``, defaults in ``--help``, one error style for every
subcommand (``gradsel <cmd>: error: <cause>``, exit 2, no traceback unless ``--debug``), and ``train``'s
documented, checked config (``--help`` table, ``--print-config``, errors naming the key)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import gradsel_core as gs
from gradsel_core.cli import COMMANDS, main
from gradsel_core.commands import train as train_cmd

REPO = Path(__file__).resolve().parents[1]


def cli_error(capsys, argv, command):
    """Run ``gradsel argv``; assert the one error style and return the cause."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert err.startswith(f"gradsel {command}: error: "), err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err[len(f"gradsel {command}: error: "):]


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path.name


@pytest.fixture
def task_files(tmp_path):
    write_jsonl(tmp_path / "t_train.jsonl", [{"prompt": f"add {i} {i + 1}", "response": str(2 * i + 1)} for i in range(8)])
    write_jsonl(tmp_path / "t_eval.jsonl", [{"prompt": f"add {i} {i + 1}", "response": str(2 * i + 1)} for i in range(2)])
    return tmp_path


def write_config(tmp_path: Path, cfg) -> str:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    return str(path)


BASE = {"model": "tiny", "tasks": [{"name": "t", "train": "t_train.jsonl", "eval": "t_eval.jsonl"}],
        "batch_size": 4}


# -- version and help ------------------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"gradsel {gs.__version__}"


def test_console_script_version():
    r = subprocess.run([sys.executable, "-m", "gradsel_core.cli", "--version"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"gradsel {gs.__version__}", r.stderr


@pytest.mark.parametrize("command, expected", [
    ("select", ["(default: median_band)", "(default: 0.2)"]),
    ("inspect", ["(default: 50)"]),
    ("demo", ["(default: cpu)"]),
])
def test_help_shows_defaults(capsys, command, expected):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks
    for text in expected:
        assert text in out, (command, text)
    assert "(default: None)" not in out and "(default: False)" not in out


def test_score_demo_is_gone():
    assert "score-demo" not in COMMANDS
    with pytest.raises(SystemExit) as e:
        main(["score-demo"])
    assert e.value.code == 2


def test_train_help_documents_every_config_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    for k in train_cmd.config_keys():
        assert k.key in rows, k.key
        assert k.type in rows[k.key] and train_cmd._shown(k.default) in rows[k.key], rows[k.key]
        for a in k.allowed or ():
            assert json.dumps(a) in rows[k.key], (k.key, a)
    assert '"policy": "median_band"' in out  # the example
    # the keys the command accepts are the keys documented, and the defaults are the classes' own
    top = {k.key for k in train_cmd.config_keys() if "." not in k.key and "[]" not in k.key}
    assert set(train_cmd.TRAINER_KEYS) <= top
    defaults = {k.key: k.default for k in train_cmd.config_keys()}
    trainer = train_cmd._trainer_defaults()
    assert all(defaults[k] == trainer[k] for k in train_cmd.TRAINER_KEYS)
    assert defaults["selection.ratio"] == gs.SelectionConfig().ratio and defaults["lora.r"] == gs.LoRAConfig().r


def test_train_help_example_is_a_valid_config(tmp_path):
    ex = json.loads(json.dumps(train_cmd.EXAMPLE))
    for t in ex["tasks"]:
        (tmp_path / t["train"]).write_text('{"text": "x"}\n')
        (tmp_path / t["eval"]).write_text('{"text": "x"}\n')
    (tmp_path / ex["safety"]["harmful_prompts"]).write_text('{"prompt": "x"}\n')
    tc = train_cmd.TrainConfig.from_dict(ex, str(tmp_path))
    assert tc.selection.policy == "median_band" and tc.lora.r == 8 and tc.trainer["mode"] == "online"


def test_print_config_is_complete_and_runs(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["train", "--print-config", str(out)]) == 0
    cfg = json.loads(out.read_text())
    top = [k.key for k in train_cmd.config_keys() if "." not in k.key and "[]" not in k.key]
    assert list(cfg) == top
    assert set(cfg["tasks"][0]) == {"name", "train", "eval", "metric"}
    assert set(cfg["selection"]) == {k.key.split(".")[1] for k in train_cmd.config_keys() if k.key.startswith("selection.")}
    # stdout form is the same config
    capsys.readouterr()
    assert main(["train", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == cfg
    # refuses to overwrite
    cli_error(capsys, ["train", "--print-config", str(out)], "train")
    # the printed config runs once its task file exists (tiny data, offline median band)
    write_jsonl(tmp_path / cfg["tasks"][0]["train"], [{"prompt": f"q{i}", "response": "a" * (i % 5 + 1)} for i in range(10)])
    assert cfg["out_dir"], "a run started from --print-config must save something"
    out.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(out), "--json", "--no-progress"]) == 0
    def strict(c):
        raise AssertionError(f"{c} is not JSON")

    text = capsys.readouterr().out
    summary = json.loads(text, parse_constant=strict)  # one strict JSON object: NaN is written as null
    assert summary["tasks"] == ["task1"] and text.count("\n") == 1
    assert None in summary["forgetting"].values()  # one task: no forgetting to measure (NaN) -> null
    assert (tmp_path / cfg["out_dir"] / "state.json").exists()


# -- train: config errors name the key, no traceback --------------------------------------------------------


@pytest.mark.parametrize("change, match", [
    ({"lrr": 0.1}, "unknown key(s) ['lrr']"),
    ({"lr": "fast"}, "lr must be float, got \"fast\""),
    ({"lr": 0}, "lr = 0 must be > 0.0"),
    ({"epochs": 1.5}, "epochs must be int"),
    ({"mode": "sometimes"}, 'mode = "sometimes" is not allowed; use one of "offline", "online"'),
    ({"selection": {"policy": "median_band", "ratio": 1.5}}, "selection.ratio = 1.5 must be >= 0.0 and <= 1.0"),
    ({"selection": {"polcy": "x"}}, "unknown key(s) ['selection.polcy']"),
    ({"selection": "bogus"}, "selection.policy = \"bogus\" is not allowed"),
    ({"lora": {"r": 0}}, "lora.r = 0 must be >= 1"),
    ({"safety": {"mc": "missing.jsonl"}}, "safety.mc = 'missing.jsonl': no such file"),
    ({"tasks": []}, "tasks must hold at least one task"),
    ({"tasks": [{"name": "t"}]}, "tasks[0].train is required"),
    ({"tasks": [{"name": "t", "train": "nope.jsonl"}]}, "tasks[0].train = 'nope.jsonl': no such file"),
    ({"tasks": [{"name": "t", "train": "t_train.jsonl", "metric": "bleu"}]}, "tasks[0].metric = \"bleu\" is not allowed"),
    ({"model": "no/such/dir"}, "model = 'no/such/dir': not 'tiny' and not a directory"),
])
def test_train_config_errors_name_the_key(task_files, capsys, change, match):
    path = write_config(task_files, {**BASE, **change})
    cause = cli_error(capsys, ["train", "--config", path], "train")
    assert cause.startswith(path + ": "), cause
    assert match in cause, cause


def test_train_file_errors(tmp_path, capsys):
    assert "no such file" in cli_error(capsys, ["train", "--config", str(tmp_path / "none.json")], "train")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "tiny",\n "tasks": [}\n')
    assert "not valid JSON (line 2" in cli_error(capsys, ["train", "--config", str(bad)], "train")
    assert "--config is required" in cli_error(capsys, ["train"], "train")


def test_train_bad_record_names_the_file_and_record(task_files, capsys):
    write_jsonl(task_files / "t_train.jsonl", [{"text": "fine"}, {"id": 7, "prompt": "no response"}])
    cause = cli_error(capsys, ["train", "--config", write_config(task_files, BASE)], "train")
    assert "tasks[0].train" in cause and "t_train.jsonl" in cause and "record 1 (id 7)" in cause, cause


def test_train_debug_shows_the_traceback(task_files):
    path = write_config(task_files, {**BASE, "lr": "fast"})
    with pytest.raises(ValueError, match="lr must be float"):
        main(["--debug", "train", "--config", path])


def test_train_refuses_a_changed_config_naming_the_key(task_files, capsys):
    path = write_config(task_files, {**BASE, "out_dir": "run"})
    assert main(["train", "--config", path]) == 0
    capsys.readouterr()
    path = write_config(task_files, {**BASE, "out_dir": "run", "lr": 0.01, "selection": "random"})
    cause = cli_error(capsys, ["train", "--config", path], "train")
    assert "another configuration" in cause and "lr 0.001 -> 0.01" in cause, cause
    assert "selection null -> {" in cause, cause


# -- every subcommand: the one error style ------------------------------------------------------------------


def test_score_error_style(tmp_path, capsys):
    cause = cli_error(capsys, ["score", "--model", "tiny", "--data", str(tmp_path / "none.jsonl"),
                               "--out", str(tmp_path / "s"), "--no-progress"], "score")
    assert "none.jsonl" in cause


def test_inspect_error_style(tmp_path, capsys):
    assert str(tmp_path / "none") in cli_error(capsys, ["inspect", str(tmp_path / "none")], "inspect")


def test_select_error_style(tmp_path, capsys):
    cause = cli_error(capsys, ["select", "--scores", str(tmp_path / "none"), "--out", str(tmp_path / "k.jsonl")],
                      "select")
    assert str(tmp_path / "none") in cause


def test_select_bad_policy_error_style(tmp_path, capsys):
    write_jsonl(tmp_path / "d.jsonl", [{"text": f"record {i}"} for i in range(6)])
    assert main(["score", "--model", "tiny", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "s"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    cause = cli_error(capsys, ["select", "--scores", str(tmp_path / "s"), "--policy", "bogus",
                               "--out", str(tmp_path / "k.jsonl")], "select")
    assert "known policies" in cause


def test_demo_error_style(capsys):
    with pytest.raises(SystemExit) as e:  # an unknown method is an argparse choice error: same style, exit 2
        main(["demo", "--methods", "bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "gradsel demo: error: argument --methods: invalid choice: 'bogus'" in err
    assert "--model needs at least one --task" in cli_error(capsys, ["demo", "--model", "somewhere"], "demo")


def test_a_command_raising_systemexit_with_a_message_gets_the_error_style(monkeypatch, capsys):
    from gradsel_core.commands import inspect as inspect_cmd

    def run(args):
        raise SystemExit("something the user must fix")

    monkeypatch.setattr(inspect_cmd, "run", run)
    assert cli_error(capsys, ["inspect", "x"], "inspect") == "something the user must fix\n"


def test_internal_errors_exit_1_with_a_hint(monkeypatch, capsys):
    from gradsel_core.commands import inspect as inspect_cmd

    def run(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(inspect_cmd, "run", run)
    assert main(["inspect", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gradsel inspect: error: ZeroDivisionError: boom") and "--debug" in err
    assert "Traceback" not in err


def test_score_reads_text_prompt_response_and_chat_records(tmp_path, capsys):
    from gradsel_core.store import ScoreStore

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    write_jsonl(tmp_path / "d.jsonl", [{"id": "t", "text": "abc"}, {"id": "p", "prompt": "q", "response": "ab"},
                                       {"id": "m", "messages": chat}])
    assert main(["score", "--model", "tiny", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "s"),
                 "--no-progress"]) == 0
    store = ScoreStore.open(str(tmp_path / "s"))
    # text: every token but the first (BOS + 3 bytes); response + EOS; the assistant turn "hello\n"
    assert store.ids.tolist() == ["t", "p", "m"] and store.tokens.tolist() == [3, 3, 6]
