"""Export back to Hugging Face and import again, end to end on the demo.

The demo config is trained for 3 steps with LoRA (adapter + LoRA factors trainable), exported
with LoRA merged and as PEFT, and the exported files are loaded into a PyTorch reference assembly
(transformers' WhisperEncoder -> an LLM-SRT-style `encoder_projector` loaded strictly from the
exported LLM-SRT state dict -> `AutoModelForCausalLM` (+ `peft`) fed `inputs_embeds =
cat(speech, embed_tokens(text))`), which must give our JAX model's loss (<= 1e-4) and greedy
output. The reverse import must give an Orbax checkpoint that decodes identically.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, Blip2QFormerConfig, GenerationConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from esrt_jax import export as ex
from esrt_jax.cli import export as export_cli
from esrt_jax.infer import generate as gen
from esrt_jax.speech.load import load_model, translator_for
from esrt_jax.models.speech_llm import loss_fn
from tests.reference.qformer import EncoderProjectorQFormer, SlamModel
from tests.reference.speech_llm import torch_embeds

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

ROWS = 4


@pytest.fixture(scope="module")
def trained(demo_run):
    """The demo trained 3 steps with LoRA (tests/conftest.py); RUN_DIR/config.yaml is its config."""
    return demo_run


@pytest.fixture(scope="module")
def exports(demo_exports):
    return demo_exports


@pytest.fixture(scope="module")
def reference(trained):
    """Our model restored from the run, a dev batch and its loss / greedy output."""
    from esrt_jax.data.pipeline import make_eval_batches
    from esrt_jax.speech.build import _data_config, _dev_source

    _, run_dir = trained
    loaded = load_model(run_dir / "config.yaml", run_dir)
    cfg = loaded.run_config
    dev = _dev_source(cfg)
    batch = next(make_eval_batches(_data_config(cfg, batch_size=ROWS), loaded.tokenizer, dev, "asr",
                                   batch_size=ROWS))
    recs = [dev[int(i)] for i in batch["record"][:ROWS]]
    b = {k: batch[k] for k in ("mel", "tokens", "loss_mask", "attention_mask")}
    b["mel"] = b["mel"][..., :loaded.model.config.encoder.num_frames]  # the demo encoder takes 3 s
    loss = float(loss_fn(loaded.model, {k: jax.numpy.asarray(v) for k, v in b.items()})[0])
    tr = translator_for(loaded, max_batch=ROWS)
    src, tgt = [r.src for r in recs], [r.tgt for r in recs]
    ids = tr.generate_ids(tr.encode(b["mel"]), src, tgt, task="asr")
    return {"loaded": loaded, "batch": b, "loss": loss, "tr": tr, "src": src, "tgt": tgt, "ids": ids,
            "recs": recs}


# ----------------------------------------------------------------------------- PyTorch side

def _torch_parts(out: Path, llm):
    enc = HFWhisperEncoder.from_pretrained(out / "encoder", attn_implementation="eager").eval()
    acfg = json.loads((out / "adapter" / "config.json").read_text())
    qcfg = Blip2QFormerConfig(**acfg["hf_qformer_config"], attn_implementation="eager")
    slam = SlamModel(EncoderProjectorQFormer(qcfg, acfg["num_queries"], acfg["llm_dim"]))
    sd = torch.load(out / "adapter" / "llm_srt_adapter.pt", weights_only=True)
    slam.load_state_dict(sd, strict=True)  # LLM-SRT's attribute names, nothing missing or extra
    return enc, slam.encoder_projector.eval(), llm.eval()


def _torch_loss(parts, batch, q):
    embeds, mask = torch_embeds(parts, batch["mel"], batch["tokens"], batch["attention_mask"])
    labels = np.where(batch["loss_mask"] > 0, batch["tokens"], -100)
    labels = np.concatenate([np.full((labels.shape[0], q), -100), labels], 1)
    with torch.no_grad():
        return parts[2](inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                        labels=torch.from_numpy(labels).long()).loss.item()


def _torch_greedy(parts, ref, gen_dir: Path):
    tr = ref["tr"]
    tokens, pmask = tr.prompts(ref["src"], ref["tgt"], task="asr")
    embeds, mask = torch_embeds(parts, ref["batch"]["mel"], tokens, pmask.astype(np.int64), left_pad_speech=True)
    gcfg = GenerationConfig.from_pretrained(gen_dir)  # the exported decoding settings
    with torch.no_grad():
        out = parts[2].generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gcfg)
    return gen.trim(out.numpy(), tr.gen_cfg)


def test_export_layout_and_config(trained, exports):
    merged, peft = exports
    run_cfg = yaml.safe_load((trained[1] / "config.yaml").read_text())
    q = run_cfg["model"]["adapter"]["num_queries"]
    for out in exports:
        ec = json.loads((out / "esrt_config.json").read_text())
        assert ec["model"]["num_queries"] == q and ec["model"]["num_speech_tokens"] == q
        assert ec["model"]["split"] == "projector" and ec["model"]["pool_k"] is None
        assert ec["languages"] == run_cfg["data"]["languages"]
        assert ec["run_config"]["train"]["lr"] == run_cfg["train"]["lr"]
        assert ec["tokenizer"]["language_tags"] == "text"
        assert ec["source"]["stage"] == "asr" and ec["source"]["step"] == 3
        assert ec["encoder"]["format"] == "weights"  # tiny random encoder: no base dir to point to
        assert {"model.safetensors", "config.json", "llm_srt_adapter.safetensors", "llm_srt_adapter.pt"} <= \
            {p.name for p in (out / "adapter").iterdir()}
        card = (out / "README.md").read_text()
        assert "stage `asr`, step 3" in card and "dev_loss" in card and f"{q} queries" in card
    assert json.loads((merged / "esrt_config.json").read_text())["llm"]["format"] == "merged"
    assert (peft / "llm" / "adapter" / "adapter_config.json").is_file()
    g = json.loads((merged / "llm" / "generation_config.json").read_text())
    assert g["max_new_tokens"] == 12 and g["no_repeat_ngram_size"] == 2 and g["do_sample"] is False


def test_adapter_files_agree(exports, reference):
    from safetensors.numpy import load_file

    from esrt_jax.convert.llm_srt import adapter_to_llm_srt
    from esrt_jax.models.qformer import flat_params

    merged, _ = exports
    model = reference["loaded"].model
    ours = load_file(str(merged / "adapter" / "model.safetensors"))
    want = flat_params(model.adapter)
    assert ours.keys() == want.keys() and "query" in ours and "norm.scale" in ours
    assert all(np.array_equal(ours[k], want[k]) for k in ours)
    st = load_file(str(merged / "adapter" / "llm_srt_adapter.safetensors"))
    pt = torch.load(merged / "adapter" / "llm_srt_adapter.pt", weights_only=True)
    assert all(k.startswith("encoder_projector.") for k in st) and st.keys() == pt.keys()
    ref = adapter_to_llm_srt(model.adapter)
    assert all(np.array_equal(st[k], ref[k]) and np.array_equal(pt[k].numpy(), ref[k]) for k in st)


def test_merged_export_matches_in_pytorch(exports, reference):
    merged, _ = exports
    lora_b = [np.abs(np.asarray(v.get_value())).max() for p, v in
              __import__("flax").nnx.to_flat_state(__import__("flax").nnx.state(reference["loaded"].model.llm))
              if p[-1] == "lora_b"]
    assert lora_b and max(lora_b) > 0  # training moved LoRA: the merge is really exercised
    llm = AutoModelForCausalLM.from_pretrained(merged / "llm", attn_implementation="eager")
    parts = _torch_parts(merged, llm)
    q = reference["loaded"].model.config.num_speech_tokens
    assert abs(_torch_loss(parts, reference["batch"], q) - reference["loss"]) <= 1e-4
    got = _torch_greedy(parts, reference, merged / "llm")
    assert got == reference["ids"]
    assert sum(len(r) for r in got) > 0


def test_peft_export_matches_in_pytorch(exports, reference):
    from peft import PeftModel

    _, out = exports
    base = AutoModelForCausalLM.from_pretrained(out / "llm", attn_implementation="eager")
    q = reference["loaded"].model.config.num_speech_tokens
    # Without the adapter the loss is clearly off: the 1e-4 tolerance does tell LoRA apart.
    base_loss = _torch_loss(_torch_parts(out, base), reference["batch"], q)
    assert abs(base_loss - reference["loss"]) > 1e-3, (base_loss, reference["loss"])
    llm = PeftModel.from_pretrained(base, out / "llm" / "adapter")
    parts = _torch_parts(out, llm)
    assert abs(_torch_loss(parts, reference["batch"], q) - reference["loss"]) <= 1e-4
    assert _torch_greedy(parts, reference, out / "llm") == reference["ids"]


@pytest.mark.parametrize("which", ["merged", "peft"])
def test_import_gives_a_checkpoint_with_identical_eval(trained, exports, reference, which):
    from esrt_jax.train.bundle import import_object
    from esrt_jax.train.checkpoint import Checkpointer, abstract_like
    from esrt_jax.train.config import load_run_config
    from esrt_jax.train.optimizer import make_optimizer
    from esrt_jax.train.config import DEFAULT_DATA_BUILDER, DEFAULT_MODEL_BUILDER

    root, _ = trained
    out = exports[0] if which == "merged" else exports[1]
    new = root / f"imported_{which}"
    step_dir = ex.import_export(out, new)
    assert step_dir == new / "asr" / "checkpoints" / "3"
    loaded = load_model(new / "config.yaml", new)  # what the inference CLI / eval do
    assert loaded.step == 3 and loaded.stage == "asr"
    tr = translator_for(loaded, max_batch=ROWS)
    ids = tr.generate_ids(tr.encode(reference["batch"]["mel"]), reference["src"], reference["tgt"], task="asr")
    assert ids == reference["ids"]
    assert tr.decode(tr.encode(reference["batch"]["mel"]), reference["src"], reference["tgt"], task="asr") == \
        reference["tr"].decode(reference["tr"].encode(reference["batch"]["mel"]), reference["src"],
                               reference["tgt"], task="asr")
    b = {k: jax.numpy.asarray(v) for k, v in reference["batch"].items()}
    assert abs(float(loss_fn(loaded.model, b)[0]) - reference["loss"]) <= 1e-5
    # train.py's resume path: params + optimizer state + meta + data-iterator state restore.
    cfg = load_run_config(new / "config.yaml").for_stage("asr")
    bundle = import_object(DEFAULT_MODEL_BUILDER)(cfg, abstract=True)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shard = lambda t: jax.tree.map(lambda _: dev, t)  # noqa: E731
    opt = jax.eval_shape(make_optimizer(cfg.train).init, bundle.trainable)
    it = import_object(DEFAULT_DATA_BUILDER)(cfg, "train", process_index=0, process_count=1)
    ck = Checkpointer(new / "asr" / "checkpoints", async_save=False)
    try:
        res = ck.restore(3, abstract_like(bundle.trainable, shard(bundle.trainable)), abstract_like(opt, shard(opt)),
                         it)
    finally:
        ck.close()
    assert res["meta"]["step"] == 3 and res["meta"]["imported_from"] == str(out.absolute())
    assert len(jax.tree.leaves(res["params"])) == len(jax.tree.leaves(bundle.trainable))
    next(it)  # the restored iterator yields batches
    if which == "merged":  # train.py itself resumes the imported run for one more step
        from esrt_jax.cli import train as run

        [r] = run.main(["--stage", "asr", "--config", str(new / "config.yaml"), "--run-dir", str(new),
                        "--set", "stages.asr.train.steps=4"])
        assert r.resumed_from == 3 and r.final_step == 4 and np.isfinite(r.losses[4])


def test_eval_py_output_identical_after_import(trained, exports):
    """`eval.py --config --checkpoint` on the original run and on the imported export."""
    from esrt_jax.cli import eval as eval_cli

    root, run_dir = trained
    new = root / "imported_for_eval"
    ex.import_export(exports[0], new)
    rows = {}
    for name, cfg, ck in (("orig", run_dir / "config.yaml", run_dir), ("imported", new / "config.yaml", new)):
        out = root / f"eval_{name}"
        assert eval_cli.main(["--config", str(cfg), "--checkpoint", str(ck), "--langs", "eng,deu",
                              "--limit", "1", "--batch", "8", "--out", str(out), "--no-progress"]) == 0
        lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
        rows[name] = [(r["id"], r["tgt"], r["response"], r["asr_r"], r["s2tt_r"]) for r in lines if "id" in r]
    assert len(rows["orig"]) == 2 and rows["orig"] == rows["imported"]


def test_local_base_dirs_become_pointers(trained, exports, reference):
    """A run on local base dirs (here: the exported tiny encoder and PEFT base) with a frozen
    encoder and LLM: OUT/encoder and the PEFT base are pointers; PyTorch and the import still match."""
    from peft import PeftModel

    root, run_dir = trained
    merged, peft = exports
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    m = cfg["model"]
    m.pop("whisper_config"), m.pop("llm_config"), m.pop("tokenizer_vocab")
    m.update(whisper=str(merged / "encoder"), llm=str(peft / "llm"), tokenizer=str(peft / "llm"))
    cfg_path = root / "local_bases.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = ex.export_run(run_dir, root / "out_pointers", config=cfg_path, peft=True).out
    ec = json.loads((out / "esrt_config.json").read_text())
    assert ec["encoder"]["format"] == "pointer" and ec["llm"]["base"]["format"] == "pointer"
    assert json.loads((out / "encoder" / ex.POINTER).read_text())["base_model"] == str(merged / "encoder")
    assert sorted(p.name for p in (out / "llm").iterdir()) == [ex.POINTER, "adapter"]
    adapter_cfg = json.loads((out / "llm" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(peft / "llm")
    base = AutoModelForCausalLM.from_pretrained(adapter_cfg["base_model_name_or_path"], attn_implementation="eager")
    parts = _torch_parts(merged, PeftModel.from_pretrained(base, out / "llm" / "adapter"))
    q = reference["loaded"].model.config.num_speech_tokens
    assert abs(_torch_loss(parts, reference["batch"], q) - reference["loss"]) <= 1e-4
    new = root / "imported_pointers"
    ex.import_export(out, new)
    new_cfg = yaml.safe_load((new / "config.yaml").read_text())
    assert new_cfg["model"]["whisper"] == str(merged / "encoder") and new_cfg["model"]["llm"] == str(peft / "llm")
    loaded = load_model(new / "config.yaml", new)
    tr = translator_for(loaded, max_batch=ROWS)
    assert tr.generate_ids(tr.encode(reference["batch"]["mel"]), reference["src"], reference["tgt"],
                           task="asr") == reference["ids"]


def test_import_config_with_base_pointers(tmp_path):
    """Frozen encoder / untouched PEFT base: the new run points at the base dirs."""
    out = tmp_path / "out"
    out.mkdir()
    ec = {"format": ex.FORMAT, "version": ex.VERSION, "source": {"stage": "srt", "step": 5},
          "encoder": {"format": "pointer", "path": "/models/whisper-large-v3"}, "adapter": {"path": "adapter"},
          "llm": {"format": "peft", "base": {"format": "pointer", "path": "/models/gemma-3-4b-it"},
                  "lora": {"rank": 16, "alpha": 32.0, "targets": ["q_proj", "v_proj"]}},
          "run_config": {"model": {"whisper": "/elsewhere/w", "llm": "/elsewhere/l", "adapter": {"num_queries": 80}},
                         "lora": {"enabled": False, "dropout": 0.05},
                         "stages": {"srt": {"model": {"llm": "/x"}, "train": {"lr": 1e-5}}}}}
    (out / "esrt_config.json").write_text(json.dumps(ec))
    cfg = ex.import_config(out, tmp_path / "new")
    assert cfg["model"]["whisper"] == "/models/whisper-large-v3"
    assert cfg["model"]["llm"] == "/models/gemma-3-4b-it"
    assert cfg["model"]["tokenizer"] == str(out.absolute() / "llm" / "adapter")
    assert cfg["lora"] == {"enabled": True, "dropout": 0.05, "rank": 16, "alpha": 32.0,
                           "targets": ["q_proj", "v_proj"]}
    assert cfg["stages"]["srt"] == {"model": {}, "train": {"lr": 1e-5}}
    assert cfg["run_dir"] == str((tmp_path / "new").absolute())
    ec["version"] = 99
    (out / "esrt_config.json").write_text(json.dumps(ec))
    with pytest.raises(ex.ExportError, match="version 99 is not supported"):
        ex.import_config(out, tmp_path / "new")


def test_cli_errors(trained, tmp_path, capsys):
    _, run_dir = trained
    assert export_cli.main(["--run", str(run_dir), "--stage", "srt", "--out", str(tmp_path / "o")]) == 2
    assert "stage srt has no checkpoints" in capsys.readouterr().err
    assert export_cli.main(["--run", str(run_dir), "--step", "7", "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint at step 7 (steps present: [3])" in capsys.readouterr().err
    assert export_cli.main(["--import", str(tmp_path), "--run", str(tmp_path / "new")]) == 2
    assert "no esrt_config.json (not an esrt-jax export directory)" in capsys.readouterr().err
    (tmp_path / "esrt_config.json").write_text(json.dumps({"format": "something-else"}))
    assert export_cli.main(["--import", str(tmp_path), "--run", str(tmp_path / "new")]) == 2
    assert "is not 'esrt-jax-export'" in capsys.readouterr().err
    other = tmp_path / "norun"
    other.mkdir()
    (other / "asr" / "checkpoints" / "1").mkdir(parents=True)
    with pytest.raises(ex.ExportError, match="no run config found"):
        ex.find_run_config(other, None, "asr")
