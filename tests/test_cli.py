"""The `routefx` command on a tiny Llama saved with a BPE tokenizer (a local HF directory) and through the
`package.module:factory` form. References are independent of the CLI: the HF model's own loss, the config's
layer count, the Block-Influence rule's block count, the static router's one-route-per-layer property."""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch
import transformers as hf

from routefx.cli import main
from routefx.cli_inputs import CliError, read_token_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS, SEQ = 3, 24


def tiny_llama():
    """The factory form's model (`tests.test_cli:tiny_llama`)."""
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=104, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return hf.LlamaForCausalLM(cfg).eval()


def all_big_map(cm, loaded, batch):
    """A comparison for `analyze --compare`: every real token to the big branch at every layer."""
    from routefx.cli_bench import route_map
    m = route_map(cm, batch, name="all big")
    m.routes[m.routes >= 0] = m.names.index("big")
    return m


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("tiny_llama")
    text = open(hf.__file__.replace("__init__.py", "configuration_utils.py"), encoding="utf-8").read()[:40000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() <= 300
    tiny_llama().save_pretrained(d)
    hf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(d)
    (d / "calib.txt").write_text(text[:12000], encoding="utf-8")
    return d


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_on_every_command(capsys):
    for cmd in ([], ["inspect"], ["compile"], ["run"], ["bench"], ["analyze"]):
        code, out, _ = run(cmd + ["--help"], capsys)
        assert code == 0 and out.startswith("usage: routefx")
        if cmd:
            assert f"routefx {cmd[0]}" in out


def test_inspect_directory_and_factory(model_dir, capsys):
    for source in (model_dir, "tests.test_cli:tiny_llama"):
        code, out, _ = run(["inspect", source, "--seq", 16], capsys)
        assert code == 0
        assert f"{LAYERS} blocks, hidden size 48" in out
        assert all(f"model.layers.{i} " in out for i in range(LAYERS))
    code, out, _ = run(["inspect", model_dir, "--json"], capsys)
    assert len(json.loads(out)["blocks"]) == LAYERS


def test_compile_dense_onnx_and_run_matches_the_hf_model(model_dir, tmp_path, capsys):
    from safetensors.torch import save_file
    out = tmp_path / "dense"
    code, text, _ = run(["compile", model_dir, "--policy", "dense", "--backend", "onnx", "--out", out,
                         "--seq", SEQ], capsys)
    assert code == 0 and (out / "manifest.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(3))
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    code, text, _ = run(["run", out, "--ids", tmp_path / "ids.safetensors"], capsys)
    assert code == 0 and "logits [2, 17, 300]" in text
    with torch.no_grad():    # the reference: the HF model's own mean next-token loss
        logits = hf.LlamaForCausalLM.from_pretrained(model_dir).eval()(input_ids=ids).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1)).item()
    loss = float(text.split("next-token loss on the input ")[1].split()[0])
    assert math.isclose(loss, ref, abs_tol=1e-3)
    code, text, _ = run(["run", out, "--text", "def __init__(self, config", "--generate", 3], capsys)
    assert code == 0 and "greedy continuation:" in text


def test_compile_generate_and_run_continues_as_hf_generate(model_dir, tmp_path, capsys):
    """`compile --generate` writes the KV-cache graphs; `run --generate N` continues the first row as the HF
    model's greedy `generate` does."""
    from safetensors.torch import save_file
    out = tmp_path / "gen"
    code, text, _ = run(["compile", model_dir, "--policy", "dense", "--backend", "onnx", "--out", out,
                         "--seq", SEQ, "--generate"], capsys)
    assert code == 0 and "generation" in json.loads((out / "manifest.json").read_text())
    ids = torch.randint(0, 300, (1, 11), generator=torch.Generator().manual_seed(5))
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    code, text, _ = run(["run", out, "--ids", tmp_path / "ids.safetensors", "--generate", 6], capsys)
    with torch.no_grad():
        want = hf.LlamaForCausalLM.from_pretrained(model_dir).eval().generate(ids, max_new_tokens=6, do_sample=False)
    assert code == 0 and f"greedy continuation: {want[0, 11:].tolist()}" in text


def test_compile_duo_onnx_meets_the_budget_and_runs_text(model_dir, tmp_path, capsys):
    out = tmp_path / "duo"
    code, text, _ = run(["compile", model_dir, "--policy", "duo:0.5", "--router", "local", "--calibration",
                         model_dir / "calib.txt", "--seq", SEQ, "--calibration-batches", 3, "--out", out], capsys)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["policy"]["policy"] == "Duo" and manifest["policy"]["router"] == "local"
    assert abs(manifest["realised_budget"]["realised"] - 0.5) <= 0.02
    text_in = "class PretrainedConfig"
    n = len(hf.AutoTokenizer.from_pretrained(model_dir)(text_in, add_special_tokens=False)["input_ids"])
    code, text, _ = run(["run", out, "--text", text_in], capsys)
    assert code == 0 and f"input [1, {n}] -> logits [1, {n}, 300]" in text


def test_compile_eager_writes_the_plan(model_dir, tmp_path, capsys):
    from routefx.compiler.plan import Plan
    out = tmp_path / "prune"
    code, _, _ = run(["compile", model_dir, "--policy", "prune:0.5", "--backend", "eager", "--calibration",
                      model_dir / "calib.txt", "--seq", SEQ, "--calibration-batches", 2, "--out", out], capsys)
    assert code == 0
    # PruneLayers(keep=0.5) removes floor((1 - 0.5) * 3 + 0.5) = 2 of the 3 blocks
    assert len(Plan.load(str(out / "plan")).pruned) == 2
    assert json.loads((out / "report.json").read_text())["backend"] == "eager"


def test_bench_prints_cpu_and_flop_ideal(model_dir, capsys):
    code, out, _ = run(["bench", model_dir, "--policy", "prune:0.5", "--backend", "eager", "--reps", 1,
                        "--calibration", model_dir / "calib.txt", "--seq", SEQ, "--calibration-batches", 2], capsys)
    assert code == 0
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None) \
        if os.path.exists("/proc/cpuinfo") else None
    assert cpu is None or f"CPU: {cpu}" in out
    rows = {l.split()[0]: l.split() for l in out.splitlines() if l.split() and l.split()[0] in ("dense", "prune:0.5")}
    dense_flops, prune_flops = (float(rows[k][5].replace(",", "")) for k in ("dense", "prune:0.5"))
    # one block of three kept: per-token FLOPs fall well below dense, and FLOP-ideal is their ratio
    assert prune_flops < 0.6 * dense_flops
    assert math.isclose(float(rows["prune:0.5"][3].rstrip("x")), dense_flops / prune_flops, rel_tol=0.01)


def test_analyze_static_router_routes_each_layer_one_way(model_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "map.png"
    code, out, _ = run(["analyze", model_dir, "--policy", "duo:0.5", "--router", "static", "--calibration",
                        model_dir / "calib.txt", "--seq", SEQ, "--calibration-batches", 2, "--plot", png,
                        "--compare", "tests.test_cli:all_big_map"], capsys)
    assert code == 0
    layers = [l for l in out.splitlines() if l.strip().startswith("model.layers.")]
    assert len(layers) == LAYERS
    big = []
    for line in layers:          # a static router sends every token of a layer the same way
        mix = [float(part.split("=")[1]) for part in line.split("(")[0].split()[1:]]
        assert sorted(mix) == [0.0, 0.0, 1.0], line
        big.append(mix[2])
    # the comparison agrees with the router exactly at the layers the static router sends to the big branch
    agree = next(l for l in out.splitlines() if l.startswith("all big: budget 1.000"))
    assert [float(a) for a in agree.split("per layer")[1].split()] == big
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 600 and height > 200


def test_bad_arguments_are_one_line_with_exit_code_2(model_dir, tmp_path, capsys):
    cases = [
        (["compile", model_dir, "--policy", "duo:abc", "--out", tmp_path / "x"], "policy 'duo:abc'"),
        (["compile", model_dir, "--policy", "duo:0.5", "--out", tmp_path / "x"], "needs calibration data"),
        (["compile", model_dir, "--policy", "duo:1.5", "--out", tmp_path / "x", "--calibration",
          model_dir / "calib.txt"], "budget must be a compute fraction"),
        (["inspect", tmp_path / "missing"], "neither a local model directory"),
        (["inspect", "tests.test_cli:no_such_factory"], "no callable 'no_such_factory'"),
        (["run", tmp_path, "--text", "x"], "manifest.json is missing"),
        (["compile", model_dir, "--policy", "dense", "--backend", "tpu", "--out", tmp_path / "x"], "invalid choice"),
    ]
    for argv, message in cases:
        code, _, err = run(argv, capsys)
        assert code == 2, argv
        assert len(err.strip().splitlines()) == 1 and message in err, err


def test_command_line_process_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "routefx.cli", "bench", str(tmp_path / "missing"), "--policy",
                           "prune:2"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "neither a local model directory" in proc.stderr


def test_token_files(tmp_path, model_dir):
    from safetensors.torch import save_file
    ids = torch.arange(50).view(5, 10)
    save_file({"input_ids": ids}, str(tmp_path / "rows.safetensors"))
    batches = read_token_file(str(tmp_path / "rows.safetensors"), None, seq=8, batch=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), ids)
    save_file({"input_ids": torch.arange(50)}, str(tmp_path / "flat.safetensors"))
    flat = read_token_file(str(tmp_path / "flat.safetensors"), None, seq=8, batch=4)
    assert torch.equal(torch.cat([b["input_ids"] for b in flat]), torch.arange(48).view(6, 8))
    tok = hf.AutoTokenizer.from_pretrained(model_dir)
    text = read_token_file(str(model_dir / "calib.txt"), tok, seq=16, batch=4, max_batches=2)
    expect = tok((model_dir / "calib.txt").read_text(), add_special_tokens=False)["input_ids"][:128]
    assert torch.equal(torch.cat([b["input_ids"] for b in text]).reshape(-1), torch.tensor(expect))
    with pytest.raises(CliError, match="plain text, but the model has no tokenizer"):
        read_token_file(str(model_dir / "calib.txt"), None, seq=16, batch=4)


def test_bench_compiled_times_baselines_in_the_same_rounds():
    """A baseline (the uncompiled model) is timed beside the compiled ones, with dense's FLOPs, listed first; its
    label may not clash with a compiled one's."""
    import routefx
    from routefx.cli_bench import bench_compiled, busy_note, format_bench
    model = tiny_llama()
    x = {"input_ids": torch.randint(0, 300, (1, SEQ), generator=torch.Generator().manual_seed(0)),
         "attention_mask": torch.ones(1, SEQ, dtype=torch.long)}
    compiled = {"dense": routefx.compile(model, routefx.policies.Dense(), backend="eager"),
                "prune": routefx.compile(model, routefx.policies.PruneLayers(layers=[1]), backend="eager")}
    calls = []

    def hf():
        calls.append(1)
        with torch.inference_mode():
            return model(**x, use_cache=False)
    rows = bench_compiled(compiled, x, reps=2, baselines={"HF eager": hf})
    assert [r["label"] for r in rows] == ["HF eager", "dense", "prune"]
    by = {r["label"]: r for r in rows}
    assert by["HF eager"]["flops"] == by["dense"]["flops"] and by["HF eager"]["ideal"] == 1.0
    assert by["prune"]["flops"] < by["dense"]["flops"]
    assert by["dense"]["speedup"] == 1.0
    assert math.isclose(by["HF eager"]["speedup"], by["dense"]["ms"] / by["HF eager"]["ms"])
    assert len(calls) >= 2 * 3  # each timed round: warm calls, then the timed one
    assert all(r["others_cores"] is None or r["others_cores"] >= 0 for r in rows)
    assert "HF eager" in format_bench(rows)
    rows[0]["others_cores"] = 1.5
    assert "other processes used 1.5 cores" in busy_note(rows)
    rows[0]["others_cores"] = 0.0
    assert busy_note(rows) == ""
    with pytest.raises(ValueError, match="baseline labels"):
        bench_compiled(compiled, x, reps=1, baselines={"dense": hf})


def test_others_watch_subtracts_this_processs_own_cpu_time(monkeypatch):
    """Others' cores = (the machine's busy time - this process's CPU time) / wall time, from /proc/stat's ticks and
    os.times (both faked here: 2 s of wall time, 5 busy core-seconds, 1.5 of them this process's)."""
    import collections

    from routefx import cli_bench
    T = collections.namedtuple("T", "user system elapsed")
    ticks = os.sysconf("SC_CLK_TCK")
    clock = iter([(T(10.0, 1.0, 100.0), 1000 * ticks), (T(11.0, 1.5, 102.0), 1005 * ticks)])
    state = {}

    def fake_busy():
        state["times"], busy = next(clock)
        return busy
    monkeypatch.setattr(cli_bench, "_busy_jiffies", fake_busy)
    monkeypatch.setattr(cli_bench.os, "times", lambda: state["times"])
    with cli_bench._OthersWatch() as w:
        pass
    assert w.others_cores == pytest.approx((5.0 - 1.5) / 2.0)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")
def test_others_watch_sees_another_process_spinning():
    """A child process spinning while this one sleeps shows up as about one core of others' time."""
    import time

    from routefx.cli_bench import _OthersWatch
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    try:
        time.sleep(0.2)
        with _OthersWatch() as others:
            time.sleep(1.0)
    finally:
        child.wait()
    assert others.others_cores > 0.6, others.others_cores
