"""The README's and the docs' copy-and-run blocks, run as a user would on a trained demo run.

A block is marked by `<!-- snippet: NAME -->` on the line before its fence; a name may appear in
several files, always with the same text. Bash blocks run in a fresh `bash -e` in a scratch folder
whose `runs/demo` is the session's trained demo run (tests/conftest.py: the demo config trained 3
steps with LoRA), python blocks with this interpreter in the same folder. Substituted, and only
this: `configs/demo.yaml` -> `runs/demo/config.yaml` (the demo config plus the fixture's overrides,
which `train.py` saved there), `python train.py` / `python eval.py` -> the checkout's scripts,
port 8080 -> a free port, and the demo corpus folder -> where this session's corpus is.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- snippet: ([\w-]+) -->\n```(\w+)\n(.*?)^```", re.S | re.M)
CORPUS = "~/.cache/esrt_jax/demo-eng-deu-fra-v8"
# every marked snippet, and the test that runs it
KNOWN = {"infer", "eval", "export", "transformers", "serve-edge"}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def snippets() -> dict[str, tuple[str, str, list[str]]]:
    """name -> (language, text, [files that hold it])."""
    out: dict[str, tuple[str, str, list[str]]] = {}
    for f in doc_files():
        for name, lang, text in MARK.findall(f.read_text(encoding="utf-8")):
            rel = str(f.relative_to(ROOT))
            if name in out:
                assert out[name][:2] == (lang, text), f"snippet {name!r} differs between {out[name][2]} and {rel}"
                out[name][2].append(rel)
            else:
                out[name] = (lang, text, [rel])
    return out


def test_marked_snippets_are_the_known_ones_and_agree():
    found = snippets()
    assert set(found) == KNOWN, f"marked snippets without a test here, or tests without a snippet: {set(found) ^ KNOWN}"
    for name in ("infer", "serve-edge", "export", "transformers"):
        assert "README.md" in found[name][2], f"the README's quickstart lost snippet {name!r}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 20_000 and "\n## Demo\n" in readme
    assert readme.startswith("# esrt-jax\n\n```bash\npython3 -m venv .venv")
    for f in doc_files():  # the offline builders are a development detail, never a user's step
        text = f.read_text(encoding="utf-8")
        assert "../shared" not in text, f"{f.relative_to(ROOT)} refers to ../shared"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def work(demo_run, tmp_path_factory):
    """(scratch folder with runs/demo -> the trained demo run, substitutions, environment)."""
    from esrt_jax.data.demo import demo_corpus_for
    from esrt_jax.train.config import load_run_config

    _, run_dir = demo_run
    d = tmp_path_factory.mktemp("snippets")
    (d / "runs").mkdir()
    (d / "runs" / "demo").symlink_to(run_dir)
    corpus = demo_corpus_for(load_run_config(run_dir / "config.yaml").data, progress=False)
    port = _free_port()
    subs = [("configs/demo.yaml", "runs/demo/config.yaml"), ("python train.py", f"python {ROOT}/train.py"),
            ("python eval.py", f"python {ROOT}/eval.py"), ("8080", str(port)), (CORPUS, str(corpus))]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    env.update(PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
               JAX_PLATFORMS="cpu")
    return d, subs, env, corpus


def run_snippet(name: str, work, timeout: int = 900) -> str:
    """Run snippet `name` in the scratch folder; its stdout (stderr shown on failure)."""
    d, subs, env, _ = work
    lang, text, files = snippets()[name]
    for a, b in subs:
        text = text.replace(a, b)
    cmd = ["bash", "-e", "-c", text] if lang == "bash" else [sys.executable, "-c", text]
    p = subprocess.Popen(cmd, cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # its own group: a background server dies with it
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert p.returncode == 0, f"snippet {name!r} ({', '.join(files)}) failed ({p.returncode}):\n{err[-4000:]}"
    return out


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_eval_infer_export_and_transformers(work):
    """eval -> infer -> export -> the export loaded by torch + transformers alone, which gives the
    infer CLI's output; the model card lists the held-out-voice test set and holds the docs' snippet."""
    d, _, _, corpus = work
    out = run_snippet("eval", work)
    assert "held-out clips" in out and "held-out sentences" in out
    [infer] = _json_lines(run_snippet("infer", work))
    assert infer["id"] == "demo003-eng-f4" and {"transcription", "translation"} <= set(infer)

    run_snippet("export", work)
    card = (d / "hf" / "demo" / "README.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| `")]
    assert any("heldout_clips" in r for r in rows) and any("test_clips" in r for r in rows), rows
    assert "`heldout_clips_*`: the training sentences in a voice held out" in card  # says what each set is
    assert "esrt-jax[" not in card, "esrt-jax is not on PyPI: the card must not pip install it by name"
    card_code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    docs_code = snippets()["transformers"][1]
    clip = re.compile(r'^CLIP = .*$', re.M)
    assert clip.sub("CLIP", card_code) == clip.sub("CLIP", docs_code), \
        "docs/export.md's transformers snippet is no longer the model card's (esrt_jax/export/card.py)"

    [hf] = _json_lines(run_snippet("transformers", work))
    assert hf == {"transcription": infer["transcription"], "translation": infer["translation"]}


@pytest.mark.slow  # the service as a real process, compiled for every batch bucket
def test_serve_and_edge(work):
    [out] = _json_lines(run_snippet("serve-edge", work))
    assert {"transcription", "translation"} <= set(out), out
    assert (work[0] / "token.txt").read_text().strip()
