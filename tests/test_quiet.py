"""What launcher=local prints: the known third-party noise of a CPU run dropped by its exact message (an unlisted
warning still shows), a line before the DeepSpeed ranks' start, and the embed line of a run reusing embed.from."""
import json
import logging
import re
import subprocess
import sys
import warnings

import pytest

from slurm import launch, launch_local
from unicom_ds import config, quiet

# Each listed message as the CPU demo printed it (RUN/logs/local_embed.log and local_train.log).
NOISE = [
    "[2026-12-07 03:16:17,124] [INFO] [launch.py:174:main] Setting CUDA_VISIBLE_DEVICES=0,1",
    "[2026-12-07 03:16:14,330] [WARNING] [runner.py:214:fetch_hostfile] Unable to find hostfile, will proceed with "
    "training with local resources only.",
    "W1207 03:16:23.461000 5189 torch/utils/cpp_extension.py:183] No CUDA runtime is found, using CUDA_HOME='/usr/local'",
    "WARNING:root:No pretrained weights loaded for model 'ViT-Tiny-16'. Model initialized randomly.",
]
# Lines that look alike but are not a listed message: they must show.
KEPT = [
    "[2026-12-07 03:16:17,124] [INFO] [launch.py:245:main] process 5189 spawned with command: ['python', '-u']",
    "[2026-12-07 03:16:14,330] [WARNING] [runner.py:214:fetch_hostfile] Unable to find hostfile /etc/hosts",
    "W1207 03:16:23.461000 5189 torch/utils/cpp_extension.py:183] No CUDA runtime is found, and no CPU compiler",
    "WARNING:root:No pretrained weights loaded for model 'ViT-B-32'. Model initialized randomly. Check the file name.",
    "error: No pretrained weights loaded for model 'ViT-B-32' because the file is damaged",
    "[train] step 10/200 epoch 0 loss 27.6132 lr 0.001 291.6 img/s",
]
MESSAGE = quiet.WARNINGS[0][1]


@pytest.mark.parametrize("line", NOISE)
def test_each_listed_log_message_is_dropped(line):
    assert quiet.is_noise(line) and quiet.is_noise(line + "\n")


@pytest.mark.parametrize("line", KEPT)
def test_an_unlisted_line_passes(line):
    assert not quiet.is_noise(line)


def test_every_listed_log_message_has_an_example():
    for pattern in quiet.LOG_MESSAGES:
        assert any(re.search(f"(?:{pattern})$", line) for line in NOISE), pattern


def test_listed_warnings_are_ignored_in_process_and_others_show():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn(MESSAGE, FutureWarning)
        warnings.warn(MESSAGE + " Or not.", FutureWarning)  # the message is matched whole
        warnings.warn(MESSAGE, UserWarning)                   # and with its category
        warnings.warn("`torch.distributed.reduce_op` is deprecated", FutureWarning)
    assert [(w.category, str(w.message)) for w in seen] == [
        (FutureWarning, MESSAGE + " Or not."), (UserWarning, MESSAGE),
        (FutureWarning, "`torch.distributed.reduce_op` is deprecated")]


def test_root_logger_drops_listed_messages_only(capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    try:
        quiet.install()
        quiet.install()  # twice: one filter
        assert root.filters.count(quiet._drop) == 1
        logging.warning("No pretrained weights loaded for model '%s'. Model initialized randomly.", "ViT-Tiny-16")
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly. Really.")
    finally:
        root.removeHandler(handler)
        root.removeFilter(quiet._drop)
    assert capsys.readouterr().err == "No pretrained weights loaded for model 'x'. Model initialized randomly. Really.\n"


def test_torchs_extension_builder_drops_its_cuda_line_on_a_cpu_machine():
    """torch logs "No CUDA runtime is found" on its own logger (with its own handler) when the extension builder is
    imported, as DeepSpeed's op build does: a filter on the root never sees it."""
    def stderr(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stderr

    control = stderr("import torch.utils.cpp_extension")
    if "No CUDA runtime is found" not in control:
        pytest.skip("torch finds a CUDA runtime here: it says nothing to drop")
    quieted = stderr("from unicom_ds import quiet; quiet.install(); import logging, torch.utils.cpp_extension; "
                     "logging.getLogger('torch.utils.cpp_extension').warning('Error building extension x')")
    assert "No CUDA runtime is found" not in quieted and "Error building extension x" in quieted


def test_child_processes_ignore_listed_warnings_through_the_environment():
    code = ("import warnings; warnings.warn(%r, FutureWarning); warnings.warn('something else', FutureWarning)"
            % MESSAGE)
    env = quiet.child_env({"PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "default"})
    assert env["PYTHONWARNINGS"].startswith("default,ignore:`torch.distributed.all_gather_into_tensor`")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "all_gather_into_tensor" not in res.stderr and "FutureWarning: something else" in res.stderr
    assert all(":" not in m and "," not in m for _, m in quiet.WARNINGS)  # PYTHONWARNINGS' separators


def test_streaming_drops_noise_of_a_steps_processes(capsys):
    lines = NOISE + KEPT
    launch_local.run_subprocess([sys.executable, "-c", f"print({chr(10).join(lines)!r})"])
    out = capsys.readouterr().out
    assert out.splitlines()[1:] == KEPT  # after the `$ argv` line


def test_a_line_says_the_ranks_are_starting(monkeypatch, capsys):
    argv = [sys.executable, "-c", "print('rank output')", "--num_gpus", "2"]
    monkeypatch.setattr(launch_local, "target", lambda step: lambda cfg: argv)
    launch_local.run_step(launch.Job("train", ((),), None, {}), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "starting 2 DeepSpeed ranks (about 20 s)..." and out[-1] == "rank output"


def test_embed_from_outcome_names_the_reused_shards(tmp_path):
    source, run = tmp_path / "run1", tmp_path / "run2"
    (source / "embed").mkdir(parents=True)
    for i in range(4):
        (source / "embed" / f"{i:05d}.done.json").write_text(json.dumps({"n": 300 + i, "skipped": {}}))
    cfg = config.resolve([f"run_dir={run}", f"embed.from={source}", "stage=embed",
                          f"data.shards={tmp_path}/{{00000..00003}}.tar", "embed.shards_per_task=2"])
    job, = launch.plan(cfg)
    assert launch_local.outcome(cfg, job) == f"4 shards reused from {source} (embed.from), 1206 rows"


def test_import_and_detect_outcomes_count_and_name_what_they_hold(tmp_path):
    """The import's line counts the rows the join dropped too (join.json), not only the shards' own; detect's line
    names each model its APs belong to."""
    run = tmp_path / "run"
    (run / "embed" / "parts").mkdir(parents=True)
    (run / "embed" / "00000.done.json").write_text(json.dumps({"n": 40, "skipped": {"nonfinite_feature": 1}}))
    (run / "embed" / "parts" / "join.json").write_text(json.dumps({"skipped": {"not_in_download": 17}}))
    for model, ap in (("run", 0.044), ("mlcd_runs_demo-mlcd_hf", 0.0)):
        (run / "detect" / model).mkdir(parents=True)
        (run / "detect" / model / "metrics.json").write_text(json.dumps({"metrics": {"box/AP": ap, "mask/AP": ap}}))
    imp = launch.Job("import", ((["0"],),), None, {})
    cfg = config.resolve([f"run_dir={run}"])
    assert launch_local.outcome(cfg, imp) == "1 part -> 1 shard, 40 rows (18 released rows dropped)"
    assert launch_local.outcome(cfg, launch.Job("detect", ((),), None, {})) == \
        "mlcd_runs_demo-mlcd_hf: box AP 0.0, mask AP 0.0; run: box AP 4.4, mask AP 4.4"
