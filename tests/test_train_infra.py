"""Training infrastructure, in process: config, schedules, rules, step, sharding, checkpoints.

Uses the tiny NNX model + Grain data of tests/train_toy.py (not the speech LLM).
"""

import json
import shutil

import jax
import numpy as np
import pytest

import train_toy
from train_toy import TOY, toy_yaml
from esrt_jax import sharding
from esrt_jax.cli import train as run_cli
from esrt_jax.config import ConfigError, from_dict
from esrt_jax.train import mesh as mesh_lib
from esrt_jax.train.checkpoint import CheckpointMismatch, Checkpointer, abstract_like, restore_params
from esrt_jax.train.config import MeshConfig, RunConfig, TrainConfig, load_run_config
from esrt_jax.train.loop import run_stage, stage_shardings
from esrt_jax.train.optimizer import make_optimizer, make_schedule
from esrt_jax.train.step import NonFiniteError, make_train_step

def toy_cfg(**train):
    d = json.loads(json.dumps(TOY))
    d["train"].update(train)
    return from_dict(RunConfig, d).for_stage("asr")


def run_toy(cfg, stage_dir, mesh, init=None):
    return run_stage(cfg, train_toy.build_model(cfg), stage_dir=stage_dir, mesh=mesh, init_params=init,
                     make_data=lambda: train_toy.build_data(cfg, "train", process_index=0, process_count=1),
                     make_dev=lambda: train_toy.build_data(cfg, "dev", process_index=0, process_count=1))


def mesh1():
    return mesh_lib.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


def mesh8():
    return mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


# ----------------------------------------------------------------------------- config

def test_stage_overrides_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train: {lr: 1.0e-4, steps: 10}\nstages:\n  srt: {train: {lr: 1.0e-5}}\n")
    cfg = load_run_config(y, ["stages.smt.train.steps=3"])
    assert cfg.for_stage("srt").train.lr == 1e-5 and cfg.for_stage("srt").train.steps == 10
    assert cfg.for_stage("smt").train.steps == 3 and cfg.for_stage("asr").train.lr == 1e-4
    with pytest.raises(ConfigError, match="train.lrr"):
        load_run_config(y, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="stages.srt.*train.batch_size.*grad_accum"):
        load_run_config(y, ["stages.srt.train.batch_size=6", "stages.srt.train.grad_accum=4"])
    with pytest.raises(ConfigError, match="stages.mt.*unknown stage"):
        load_run_config(y, ["stages.mt.train.lr=1"])
    with pytest.raises(ConfigError, match="mesh: data\\*fsdp\\*tensor = 3\\*1\\*1 = 3 but 8 devices"):
        mesh_lib.make_mesh(MeshConfig(data=3))


def test_schedule_warmup_linear_cosine():
    s = make_schedule(TrainConfig(lr=1.0, warmup_steps=10, steps=110, schedule="linear"))
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.5) and float(s(110)) == pytest.approx(0.0)
    c = make_schedule(TrainConfig(lr=1.0, warmup_steps=0, steps=100, schedule="cosine", end_lr=0.1))
    assert float(c(0)) == pytest.approx(1.0) and float(c(50)) == pytest.approx(0.55) and float(c(100)) == pytest.approx(0.1)


def test_lr_scale_gives_a_param_group_its_own_lr(tmp_path):
    cfg = from_dict(RunConfig, {"train": {"lr": 0.1, "warmup_steps": 0, "schedule": "constant", "clip_norm": 0,
                                          "weight_decay": 0.0, "lr_scale": {"/lora_[ab]$": 0.1}}})
    params = {"adapter": {"w": np.ones(3, np.float32)}, "llm": {"lora_a": np.ones(3, np.float32)}}
    grads = jax.tree.map(lambda x: 0.5 * x, params)
    opt = make_optimizer(cfg.train)
    upd, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(upd["adapter"]["w"], -0.1, rtol=1e-5)  # Adam's first step: -lr * sign
    np.testing.assert_allclose(upd["llm"]["lora_a"], -0.01, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"lr_scale: '/lora_b\$' matches no trainable param"):
        make_optimizer(TrainConfig(lr_scale={"/lora_b$": 0.1}), params)
    with pytest.raises(ConfigError, match=r"lr_scale\.x: must be > 0"):
        from_dict(RunConfig, {"train": {"lr_scale": {"x": 0.0}}})
    staged = from_dict(RunConfig, {"stages": {"srt": {"train": {"lr_scale": {"^llm/": 0.5}}}}})
    assert staged.for_stage("srt").train.lr_scale == {"^llm/": 0.5} and staged.for_stage("asr").train.lr_scale == {}
    # through the trainer (sharded optimizer state), and a regex that names no trainable param
    assert run_toy(toy_cfg(lr_scale={"^head/": 0.5}), tmp_path / "ok", mesh1()).final_step == 5
    with pytest.raises(ConfigError, match="matches no trainable param"):
        run_toy(toy_cfg(lr_scale={"^hed/": 0.5}), tmp_path / "typo", mesh1())


def test_rules_spec_for():
    m = mesh8()
    rules = mesh_lib.make_rules({})
    P = jax.sharding.PartitionSpec
    assert mesh_lib.spec_for((16, 32), ("embed", "mlp"), m, rules) == P("fsdp", "tensor")
    assert mesh_lib.spec_for((15, 32), ("embed", "mlp"), m, rules) == P(None, "tensor")  # 15 % 2
    assert mesh_lib.spec_for((16, 16), ("embed", "embed"), m, rules) == P("fsdp")
    with pytest.raises(ConfigError, match="mesh.rules.bogus"):
        mesh_lib.spec_for((4,), ("bogus",), m, rules)
    # the trainer's mesh is the one mesh builder's (esrt_jax.sharding.make_mesh), Auto axes
    assert m == sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert m.axis_types == (jax.sharding.AxisType.Auto,) * 3
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        mesh_lib.make_rules({"mlp": "model"})


# ----------------------------------------------------------------------------- step

def test_trainable_partition_and_grad_accumulation():
    cfg = toy_cfg()
    b = train_toy.build_model(cfg)
    assert set(b.trainable) == {"adapter_in", "adapter_out", "head"} and set(b.frozen) == {"encoder"}
    assert b.trainable_axes["head"]["kernel"] == ("embed", "vocab")
    opt = make_optimizer(cfg.train)
    # Deterministic loss (no dropout), full masks: 2 micro-batches of 4 == 1 batch of 8.
    def loss(t, f, batch, rng):
        return b.loss_fn(t, f, batch, None)
    step = jax.jit(make_train_step(loss, opt))
    batch = next(train_toy.build_data(cfg, "train", process_index=0, process_count=1))
    batch["mask"] = np.ones_like(batch["mask"])
    one = {k: v[None] for k, v in batch.items()}
    two = {k: v.reshape(2, 4, *v.shape[1:]) for k, v in batch.items()}
    p1, _, m1 = step(b.trainable, opt.init(b.trainable), b.frozen, one, jax.random.key(0))
    p2, _, m2 = step(b.trainable, opt.init(b.trainable), b.frozen, two, jax.random.key(0))
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), abs=1e-6)
    assert float(m1["tokens"]) == float(m2["tokens"]) == 32.0
    for a, c in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, c, atol=1e-6)
    # Frozen params get no optimizer state at all.
    assert len(jax.tree.leaves(opt.init(b.trainable))) == 2 + 2 * len(jax.tree.leaves(b.trainable))  # 2 step counts


def test_nonfinite_stops_with_last_good_checkpoint(tmp_path):
    cfg = toy_cfg(steps=8, ckpt_every=3, log_every=1)
    bundle = train_toy.build_model(cfg)
    good = bundle.loss_fn
    calls = {"n": 0}

    def data():
        it = train_toy.build_data(cfg, "train", process_index=0, process_count=1)
        class Poison:
            def __next__(self):
                calls["n"] += 1
                b = next(it)
                if calls["n"] == 5:  # step 5's batch carries a NaN
                    b["x"] = np.full_like(b["x"], np.nan)
                return b
            get_state, set_state = it.get_state, it.set_state
        return Poison()

    bundle.loss_fn = good
    with pytest.raises(NonFiniteError, match=r"step 5: non-finite loss.*last good checkpoint is step 3"):
        run_stage(cfg, bundle, stage_dir=tmp_path, mesh=mesh1(), make_data=data)
    ck = Checkpointer(tmp_path / "checkpoints")
    assert ck.latest_step() == 3
    ck.close()


# ----------------------------------------------------------------------------- sharding + restore

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("shard")
    cfg = toy_cfg()
    r1 = run_toy(cfg, d / "one", mesh1())
    r8 = run_toy(cfg, d / "eight", mesh8())
    return cfg, d, r1, r8


def test_same_losses_on_1_and_8_devices(runs):
    cfg, d, r1, r8 = runs
    assert sorted(r1.losses) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([r8.losses[s] for s in range(1, 6)], [r1.losses[s] for s in range(1, 6)],
                               atol=1e-5, rtol=0)
    assert r1.losses[5] < r1.losses[1]
    assert abs(r1.dev["dev_loss"] - r8.dev["dev_loss"]) < 1e-5


def test_dev_loss_with_shuffled_input_shows_the_audio_gap(runs, tmp_path):
    cfg, d, r1, _ = runs
    # 5 steps of the toy: a small but real gap (0.038 with the swap rule, half a batch away; the
    # deaf model below has none)
    assert r1.dev["dev_loss_shuffled"] > r1.dev["dev_loss"] + 0.02, r1.dev
    assert r1.dev["dev_audio_gap"] == pytest.approx(r1.dev["dev_loss_shuffled"] - r1.dev["dev_loss"])
    logged = [json.loads(l) for l in (d / "one" / "metrics.jsonl").read_text().splitlines()]
    assert any("dev_loss_shuffled" in rec for rec in logged)
    deaf = from_dict(RunConfig, {**json.loads(json.dumps(TOY)), "model": {**TOY["model"], "deaf": True}}
                     ).for_stage("asr")
    r = run_toy(deaf, tmp_path / "deaf", mesh1())
    assert abs(r.dev["dev_audio_gap"]) < 1e-6, r.dev


def test_checkpoint_saved_on_8_devices_restores_on_1(runs):
    cfg, d, r1, r8 = runs
    longer = toy_cfg(steps=8)
    shutil.copytree(d / "eight", d / "eight_then_one")
    shutil.copytree(d / "eight", d / "eight_then_eight")
    a = run_toy(longer, d / "eight_then_one", mesh1())     # resumes at step 5 on 1 device
    b = run_toy(longer, d / "eight_then_eight", mesh8())
    assert a.resumed_from == 5 and b.resumed_from == 5
    np.testing.assert_allclose([a.losses[s] for s in range(6, 9)], [b.losses[s] for s in range(6, 9)],
                               atol=1e-5, rtol=0)
    # And the params-only restore (stage chaining) onto a 1-device mesh.
    m = mesh1()
    bundle = train_toy.build_model(cfg)
    sh = stage_shardings(bundle, make_optimizer(cfg.train), m, mesh_lib.make_rules({}))
    params, step = restore_params(d / "eight" / "checkpoints", abstract_like(bundle.trainable, sh["trainable"]))
    assert step == 5
    assert all(x.sharding.mesh.devices.size == 1 for x in jax.tree.leaves(params))


def test_params_new_in_a_stage_start_from_their_init(runs, capsys):
    """E.g. LoRA enabled after an adapter-only ASR stage: saved params restored, new ones from `fill`."""
    cfg, d, _, _ = runs
    ck = d / "eight" / "checkpoints"
    bundle = train_toy.build_model(cfg)
    saved, _ = restore_params(ck, bundle.trainable)
    grown = {**bundle.trainable, "lora_new": {"b": np.full((3,), 7.0, np.float32)}}
    with pytest.raises(CheckpointMismatch, match="lora_new/b: missing vs"):
        restore_params(ck, grown)
    params, step = restore_params(ck, grown, fill=grown)
    assert step == 5 and "1 params are not in" in capsys.readouterr().err
    np.testing.assert_array_equal(params["lora_new"]["b"], 7.0)
    for a, b in zip(jax.tree.leaves({k: v for k, v in params.items() if k != "lora_new"}), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)
    reshaped = jax.tree.map(lambda x: np.zeros((*x.shape, 2), x.dtype), bundle.trainable)
    with pytest.raises(CheckpointMismatch, match="params differ"):
        restore_params(ck, reshaped, fill=reshaped)  # a shape change is never filled


def test_changed_optimizer_is_a_mismatch_not_a_damaged_step(runs):
    """Resuming a stage with another optax chain (here train.lr_scale added) names the cause and
    leaves every saved step in place (a failed restore would otherwise move them aside as corrupt)."""
    cfg, d, _, _ = runs
    shutil.copytree(d / "one", d / "one_scaled")
    scaled = toy_cfg(steps=8, lr_scale={".": 0.5})
    with pytest.raises(CheckpointMismatch, match="another optimizer state.*lr_scale"):
        run_toy(scaled, d / "one_scaled", mesh1())
    assert not list((d / "one_scaled").rglob("*.corrupt"))
    assert run_toy(toy_cfg(steps=8), d / "one_scaled", mesh1()).resumed_from == 5


def test_finished_stage_is_skipped(runs):
    cfg, d, r1, r8 = runs
    again = run_toy(cfg, d / "one", mesh1())
    assert again.skipped and again.losses == r1.losses


def test_missing_previous_stage_names_path_and_command(tmp_path):
    y = tmp_path / "toy.yaml"
    y.write_text(json.dumps(TOY))
    with pytest.raises(SystemExit, match=rf"stage smt starts from the final checkpoint of stage asr, expected "
                                         rf"in {tmp_path}/run/asr/checkpoints, which does not exist; create it "
                                         rf"with: python train.py --stage=asr --config {y} --run-dir {tmp_path}/run"):
        run_cli.main(["--stage=smt", "--config", str(y), "--run-dir", str(tmp_path / "run")])


def test_missing_init_from_is_one_line(tmp_path):
    y = tmp_path / "toy.yaml"
    y.write_text(json.dumps(TOY))
    with pytest.raises(SystemExit, match=rf"--init-from {tmp_path}/nope: no such checkpoint folder"):
        run_cli.main(["--stage=asr", "--config", str(y), "--run-dir", str(tmp_path / "run"),
                      "--init-from", str(tmp_path / "nope")])


def test_from_init_starts_a_later_stage_without_the_previous_one(tmp_path):
    y = tmp_path / "toy.yaml"
    y.write_text(json.dumps(TOY))
    args = ["--stage=smt", "--config", str(y), "--run-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match="--init-from DIR or --from-init, not both"):
        run_cli.main(args + ["--from-init", "--init-from", str(tmp_path)])
    (res,) = run_cli.main(args + ["--from-init"])
    assert res.final_step == 5 and not (tmp_path / "run" / "asr").exists()


def test_train_help_documents_the_stage(capsys):
    with pytest.raises(SystemExit):
        run_cli.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "curriculum stage to train" in out and "(default: all)" in out


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_step(tmp_path, capsys):
    y = toy_yaml(tmp_path, steps=4, ckpt_every=2, keep=3)
    run = tmp_path / "run"
    base = ["--stage=asr", "--config", str(y), "--run-dir", str(run), "--compile-cache", ""]
    run_cli.main(base)
    ck = run / "asr" / "checkpoints"
    meta = ck / "4" / "params" / "_METADATA"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])  # a truncated file in the newest step
    capsys.readouterr()
    (res,) = run_cli.main(base + ["--set", "train.steps=6"])
    err = capsys.readouterr().err
    warn = [line for line in err.splitlines() if "unreadable" in line]
    assert len(warn) == 1 and "checkpoint step 4" in warn[0] and "4.corrupt" in warn[0], err
    assert res.resumed_from == 2 and res.final_step == 6
    assert (ck / "4.corrupt").is_dir() and sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [2, 4, 6]
    # every kept step unreadable: a clear stop naming the steps and what to do
    for step in (2, 4, 6):
        m = ck / str(step) / "meta" / "metadata"
        m.write_bytes(m.read_bytes()[:3])
    with pytest.raises(SystemExit, match=r"no readable checkpoint left in .*asr/checkpoints: step\(s\) 6, 4, 2 "
                                         r"could not be read .* delete the folder"):
        run_cli.main(base + ["--set", "train.steps=8"])


def test_model_changing_rerun_is_refused_before_the_saved_config_is_touched(tmp_path):
    import yaml

    y = toy_yaml(tmp_path, steps=2, ckpt_every=2)
    run = tmp_path / "run"
    base = ["--stage=asr", "--config", str(y), "--run-dir", str(run), "--compile-cache", ""]
    run_cli.main(base)
    saved = (run / "config.yaml").read_text()
    with pytest.raises(SystemExit) as e:
        run_cli.main(base + ["--set", "model.mlp=48", "--set", "train.steps=4"])
    msg = str(e.value.code)
    assert len(msg.splitlines()) == 1 and msg.startswith("error: ") and "model.mlp" in msg, msg
    assert "train.steps" not in msg and str(run / "asr" / "checkpoints") in msg, msg
    assert (run / "config.yaml").read_text() == saved
    assert "mlp" not in yaml.safe_load(saved)["model"]
    (res,) = run_cli.main(base + ["--set", "train.steps=4"])  # a non-model change resumes fine
    assert res.resumed_from == 2 and yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 4


def test_dry_run_reports_memory(capsys, tmp_path):
    y = tmp_path / "toy.yaml"
    y.write_text(json.dumps(TOY))
    out = run_cli.main(["--stage=asr", "--config", str(y), "--dry-run", "--set", "mesh.fsdp=2",
                        "--set", "mesh.tensor=2"])
    rep = out[0]
    assert rep["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    # head kernel (16, 16) f32 sharded fsdp x tensor -> 1/4 per device, etc.
    assert 0 < rep["per_device_bytes"]["trainable_params"] < 1344 * 4
    assert rep["per_device_bytes"]["optimizer_state"] >= 2 * rep["per_device_bytes"]["trainable_params"]
    assert rep["flops_per_step"] > 0
    text = capsys.readouterr().out
    assert "temporaries" in text and "GiB per device" in text and "model FLOPs/step" in text
