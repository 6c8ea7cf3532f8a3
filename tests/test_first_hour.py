"""What a newcomer meets in the first hour (issue 13): the demo run twice, a finished run re-run,
``--help`` that says what each flag means, one default model, one-line errors for bad settings,
files teammates can read, progress while evaluating, the same log columns from every trainer, the
prompt echoed by ``generate`` and an honest compression chart."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ringrt.data.config import DataConfig
from ringrt.jobs.config import DemoConfig, EvalConfig, EvalJobConfig, TrainConfig, TrainJobConfig
from ringrt.model.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1)
TINY_DATA = DataConfig(seq_len=32, batch_size=2)
LOG_COLUMNS = ["loss", "lr", "grad_norm", "tokens_per_s", "flops_per_s", "peak_mem_bytes", "comm_bytes"]


def _train_cfg(out_dir, steps=3) -> TrainJobConfig:
    return TrainJobConfig(model=dataclasses.replace(TINY_MODEL), data=dataclasses.replace(TINY_DATA),
                          train=TrainConfig(steps=steps, warmup_steps=1, log_every=1, ckpt_every=0, out_dir=str(out_dir),
                                            progress=False))


def _ringrt(*args, cwd, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringrt", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# --- the demo, twice ------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_demo_run_twice_reuses_the_finished_run_and_says_where_the_model_is(tmp_path, capfd):
    from ringrt.jobs.demo import run_demo

    cfg = DemoConfig(world=1, out_dir=str(tmp_path / "demo"), model=dataclasses.replace(TINY_MODEL),
                     data=dataclasses.replace(TINY_DATA),
                     train=TrainConfig(steps=2, warmup_steps=1, ckpt_every=0, log_every=1),
                     eval=EvalConfig(multiples=[1, 2], tokens=64))
    hf = tmp_path / "demo" / "train" / "hf"
    first = run_demo(cfg)
    out_first = capfd.readouterr().out
    again = run_demo(dataclasses.replace(cfg))  # crashed formatting loss=None before
    out = capfd.readouterr().out
    ckpt = tmp_path / "demo" / "train" / "checkpoints" / "step_00000002"
    assert f"reused the finished training run (step 2, checkpoint {ckpt})" in out, out
    assert again["train"]["loss"] is None and again["perplexity"] == first["perplexity"]  # the same model, evaluated again
    assert first["trained_steps"] == 2 and again["trained_steps"] == 0 and math.isfinite(first["train"]["loss"])
    for text in (out_first, out):
        assert f"model (Hugging Face format) in {hf}" in text, text
    assert "final loss" in out_first


# --- a finished run, re-run; the plain CLI's log columns -----------------------------------------


@pytest.mark.timeout(120)
def test_a_finished_run_rerun_says_there_is_nothing_to_do(tmp_path, capsys):
    from ringrt.jobs.train import run_train

    first = run_train(_train_cfg(tmp_path / "run"))
    capsys.readouterr()
    again = run_train(_train_cfg(tmp_path / "run"))
    out = capsys.readouterr().out
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000003"
    assert f"already trained to step 3 of 3 (checkpoint in {ckpt}); nothing to do" in out, out
    assert again["loss"] is None and again["losses"] == [] and again["resumed_from"] == str(ckpt)
    assert len(first["losses"]) == 3 and first["resumed_from"] is None


@pytest.mark.timeout(120)
def test_the_plain_trainer_logs_every_column_of_the_readme(tmp_path, capsys):
    from ringrt.jobs.train import run_train

    run_train(_train_cfg(tmp_path / "run"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # the README's columns, in its order
        assert [k for k in r if k not in ("step", "time")] == LOG_COLUMNS, r
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step")]
    assert [[c.split()[0] for c in x.split(" | ")[1:]] for x in lines] == [LOG_COLUMNS] * 3, lines


def test_throughput_leaves_out_the_first_step_after_start():
    from ringrt.run.metrics import Throughput

    speed = Throughput(tokens_per_step=100)
    speed.add(5.0)  # start-up: first calls, allocations
    assert speed.take() == pytest.approx(20.0)  # the only step so far: reported as it is
    speed.add(0.5)
    speed.add(1.5)
    assert speed.take() == pytest.approx(100.0)  # 200 tokens in 2 s; the 5 s step is not in it
    speed.add(0.25)
    assert speed.take() == pytest.approx(400.0)  # a new window
    assert speed.run_mean() == pytest.approx(300 / 2.25)


@pytest.mark.timeout(120)
def test_deepspeed_logs_the_same_columns_as_the_plain_trainer(tmp_path):
    pytest.importorskip("deepspeed")
    from tests.distributed import run

    logged = run(_deepspeed_worker, 1, str(tmp_path))[0]
    assert [list(m) for m in logged] == [["loss", "lr", "grad_norm", "tokens_per_s"]] * 2, logged
    assert all(math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in logged), logged


def _deepspeed_worker(rank, world, root):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ringrt.engines.deepspeed import DeepSpeedConfig, run_train_deepspeed
    from ringrt.run.metrics import MetricsLogger

    logged = []
    run_train_deepspeed(_train_cfg(root, steps=2), DeepSpeedConfig(zero_stage=1),
                        logger=MetricsLogger([lambda step, m: logged.append(m)]))
    return logged


# --- --help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "eval", "generate", "probe", "demo"])
def test_every_flag_says_what_it_means(command):
    import argparse
    import importlib

    from ringrt.cli import COMMANDS

    p = argparse.ArgumentParser(prog=f"ringrt {command}")
    importlib.import_module(COMMANDS[command][0]).add_arguments(p)
    flags = [a for a in p._actions if not isinstance(a, argparse._HelpAction)]
    assert len(flags) >= 5
    for a in flags:
        shown = p._get_formatter()._expand_help(a) if a.help else ""  # as --help prints it
        meaning = re.sub(r"\s*\(default .*\)$", "", shown).strip()
        assert meaning, (a.option_strings, a.help)
    p.format_help()  # every help string formats (a stray % would raise here)


def test_flag_help_is_the_field_docstring():
    from ringrt.jobs.flags import field_help, fields_doc

    assert fields_doc(TrainConfig)["steps"] == "Optimizer steps."
    assert field_help(DataConfig, "tokenizer", None) == (
        "A local Hugging Face tokenizer.json; None = the byte-level tokenizer (vocab 259). (default None)")


# --- one default model -----------------------------------------------------------------------------


def test_the_cli_and_hydra_default_to_the_same_model():
    from omegaconf import OmegaConf

    defaults = OmegaConf.load(REPO / "conf" / "config.yaml").defaults
    group = next(d["model"] for d in defaults if not isinstance(d, str) and "model" in d)
    hydra_model = ModelConfig(**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{group}.yaml")))
    assert ModelConfig() == hydra_model
    assert TrainJobConfig().model == hydra_model


# --- one line for a bad setting --------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_bad_setting_is_one_line_and_exit_2(tmp_path):
    p = _ringrt("train", "--data.seq_len", "7", "--train.out_dir", str(tmp_path / "t"), cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("ringrt train: error: data.seq_len=7 cannot be split"), p.stderr
    p = _ringrt("train", "--data.seq_len", "7", "--train.out_dir", str(tmp_path / "t"), cwd=tmp_path,
                env={"RINGRT_DEBUG": "1"})
    assert p.returncode == 1 and "Traceback" in p.stderr and "ValueError: data.seq_len=7" in p.stderr, p.stderr


def test_only_our_own_value_errors_are_user_errors():
    from ringrt.run.errors import is_user_error

    def ours():
        from ringrt.data.config import DataConfig

        DataConfig(seq_len=1).validate()

    def a_library():
        json.loads("{")  # a ValueError (JSONDecodeError) raised outside ringrt

    for fn, expect in ((ours, True), (a_library, False)):
        with pytest.raises(ValueError) as e:
            fn()
        assert is_user_error(e.value) is expect, e.value
    assert not is_user_error(RuntimeError("x"))


# --- files teammates can read ----------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    from ringrt.run.rundir import atomic_write_json, atomic_write_text

    old = os.umask(umask)
    try:
        a = atomic_write_text(tmp_path / "run_config.yaml", "a: 1\n")
        b = atomic_write_json(tmp_path / "probe.json", {"ok": True})
    finally:
        os.umask(old)
    assert oct(a.stat().st_mode & 0o777) == oct(mode) and oct(b.stat().st_mode & 0o777) == oct(mode)


# --- progress while evaluating; the log file gets the step lines -----------------------------------


@pytest.mark.timeout(120)
def test_eval_prints_a_line_per_mode_and_length_as_it_goes(tmp_path):
    from ringrt.jobs.eval import run_eval
    from ringrt.model.hf import save_pretrained
    from ringrt.model.llama import Llama

    torch.manual_seed(0)
    save_pretrained(Llama(dataclasses.replace(TINY_MODEL)), tmp_path / "hf", extra={"train_len": 32})
    said: list[str] = []
    run_eval(EvalJobConfig(data=dataclasses.replace(TINY_DATA),
                           eval=EvalConfig(checkpoint=str(tmp_path / "hf"), multiples=[1, 2], tokens=64,
                                           out_dir=str(tmp_path / "eval"))), print_fn=said.append)
    progress = [s for s in said if re.match(r"eval: +(vanilla|lambda) at +\d+ tokens: perplexity [\d.]+ \(", s)]
    assert [re.findall(r"(vanilla|lambda) at +(\d+)", s)[0] for s in progress] == [
        ("vanilla", "32"), ("vanilla", "64"), ("lambda", "32"), ("lambda", "64")], said
    assert said.index(progress[-1]) < said.index(next(s for s in said if s.startswith("perplexity (trained")))


def test_step_lines_reach_the_run_log_file(tmp_path, capsys):
    from ringrt.run.metrics import ConsoleSink

    handler = logging.FileHandler(tmp_path / "train.log")  # what Hydra's job logging installs on rank 0
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        ConsoleSink()(10, {"loss": 2.5, "lr": 1e-3})
    finally:
        root.removeHandler(handler)
        handler.close()
    assert "step     10 | loss 2.5 | lr 0.001" in (tmp_path / "train.log").read_text()
    assert capsys.readouterr().out == "step     10 | loss 2.5 | lr 0.001\n"


@pytest.mark.timeout(120)
def test_hydra_train_log_holds_the_step_lines(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "data.seq_len=32", "data.batch_size=2",
                        "train.steps=2", "train.log_every=1", "train.warmup_steps=1", "logging.wandb=disabled",
                        f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path, capture_output=True, text=True, timeout=110,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    log = (tmp_path / "r" / "train.log").read_text()
    steps = [line.split("] - ", 1)[1] for line in log.splitlines() if "] - step " in line]
    assert [s.split(" | ")[0].split() for s in steps] == [["step", "1"], ["step", "2"]], log
    assert all([c.split()[0] for c in s.split(" | ")[1:]] == LOG_COLUMNS for s in steps), log


def test_step_lines_go_above_the_progress_bar(monkeypatch, capsys):
    import tqdm

    from ringrt.run import metrics

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    written = []
    real_write = tqdm.tqdm.write
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, s, file=None, **k: (written.append(s),
                                                                                        real_write(s, file=file, **k))))
    with metrics.progress_bar(total=3, initial=0, desc="train", show=True) as bar:
        assert bar is not None
        bar.update(1)
        metrics.ConsoleSink()(1, {"loss": 1.0})
    assert written == ["step      1 | loss 1"]
    assert "step      1 | loss 1\n" in capsys.readouterr().out


# --- generate echoes its prompt --------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_generate_prints_the_prompt_then_its_continuation(tmp_path):
    from ringrt.model.hf import save_pretrained
    from ringrt.model.llama import Llama

    torch.manual_seed(0)
    save_pretrained(Llama(dataclasses.replace(TINY_MODEL)), tmp_path / "hf", extra={"train_len": 32})
    p = _ringrt("generate", "--generate.checkpoint", str(tmp_path / "hf"), "--generate.prompt", "def f(x):",
                "--generate.max_new_tokens", "4", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("def f(x):") and len(p.stdout.encode()) > len("def f(x):\n"), p.stdout
    from ringrt.jobs.generate import shown

    long = "x" * 1500
    assert shown(long, "!") == "[... 500 characters of the prompt not shown ...]\n" + "x" * 1000 + "!"


# --- the compression chart -------------------------------------------------------------------------


def test_compression_chart_starts_at_zero_and_says_lower_is_better():
    from ringrt.compression.eval import _bar

    fig = _bar({"none": 10.99, "truncate": 10.65, "k=2": 10.52}, {"doc_len": 2048, "window": 256})
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and "lower is better" in ax.get_ylabel()


def test_simulate_and_gpucheck_flags_say_what_they_mean():
    import argparse
    import importlib

    from ringrt.cli import COMMANDS

    for command in ("simulate", "gpucheck"):
        p = argparse.ArgumentParser(prog=f"ringrt {command}")
        importlib.import_module(COMMANDS[command][0]).add_arguments(p)
        parsers = [p]
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                parsers += list(a.choices.values())
        for sub in parsers:
            for a in sub._actions:
                if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                    continue
                shown = sub._get_formatter()._expand_help(a) if a.help else ""
                assert re.sub(r"\s*\(default .*\)$", "", shown).strip(), (command, sub.prog, a.option_strings)
            sub.format_help()
